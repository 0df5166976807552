"""`dlengine bench` works without the serve extra (fastapi, uvicorn, pydantic, prometheus-client,
httpx), and `dlengine serve` / `router` then say what to install."""

import subprocess
import sys

BLOCKED = r'''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "prometheus_client", "starlette", "httpx"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from dlengine.cli import main
sys.argv = ["dlengine"] + sys.argv[1:]
sys.exit(main())
'''


def run(*args):
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, timeout=120)


def test_bench_without_serve_extra():
    r = run("bench", "latency", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("serve", "router"):
        r = run(cmd, "tiny-qwen3")
        assert r.returncode != 0
        assert "dlengine[serve]" in r.stderr + r.stdout
