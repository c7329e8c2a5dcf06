"""The pure modules stay pure: no I/O framework is imported by them."""


def test_pure_modules_import_no_io_frameworks():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "relay"
    pure = ["config", "errors.py", "keys.py", "net.py", "redact.py", "bounded_json.py", "balancer", "metering",
            "policy.py", "codes.py",
            "proxy/sse.py", "proxy/request.py", "proxy/multipart.py", "proxy/chunks.py", "quota/charge.py",
            "proxy/responses_sse.py"]
    banned = {"tornado", "aiohttp", "motor", "pymongo", "prometheus_client", "asyncio"}
    files = [p for name in pure for p in ((root / name).rglob("*.py") if (root / name).is_dir() else [root / name])]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.name} imports {n}"

