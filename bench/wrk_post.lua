-- wrk script for bench/proxy_compare.py --generator wrk: POST a chat body, print one result line.
wrk.method = "POST"
wrk.body = os.getenv("RELAY_BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("RELAY_BENCH_AUTH")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.4f %.4f %d\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.status + e.timeout))
end
