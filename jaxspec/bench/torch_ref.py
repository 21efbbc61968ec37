"""torchvision's `mobilenet_v3_small`, timed in a subprocess of any interpreter that has torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

_TORCH_WORKER = r"""
import json, resource, sys, time
import torch, torchvision
torch.set_num_threads(int(sys.argv[1]))
models = {}
def train(m, opt, lossf, x, y):
    m.train()
    opt.zero_grad(set_to_none=True)
    lossf(m(x), y).backward()
    opt.step()
def evaluate(m, opt, lossf, x, y):
    m.eval()
    with torch.no_grad():
        m(x)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "setup":
        torch.manual_seed(0)
        m = torchvision.models.mobilenet_v3_small(num_classes=req["classes"])
        x = torch.randn(req["batch"], 3, req["res"], req["res"])
        y = torch.randint(0, req["classes"], (req["batch"],))
        models[req["key"]] = (m, torch.optim.Adam(m.parameters(), 1e-4),
                              torch.nn.CrossEntropyLoss(label_smoothing=0.1), x, y)
        out = {"params": sum(p.numel() for p in m.parameters())}
    elif req["op"] == "time":
        fn = train if req["mode"] == "train" else evaluate
        t = time.perf_counter()
        for _ in range(req["steps"]):
            fn(*models[req["key"]])
        out = {"seconds": time.perf_counter() - t}
    else:
        out = {"torch": torch.__version__, "torchvision": torchvision.__version__,
               "threads": torch.get_num_threads(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(out), flush=True)
"""


class TorchWorker:
    """torchvision's model in a subprocess (any interpreter with torch), timed on request."""

    def __init__(self, python: str, threads: int):
        self.python = python
        self._proc = subprocess.Popen([python, "-c", _TORCH_WORKER, str(threads)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.info = self._ask(op="info")

    def _ask(self, **req) -> dict:
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"The torch worker ({self.python}) exited (rc {self._proc.wait()}); see stderr above")
        return json.loads(line)

    def setup(self, key: str, res: int, batch: int, classes: int) -> int:
        return self._ask(op="setup", key=key, res=res, batch=batch, classes=classes)["params"]

    def seconds(self, key: str, mode: str, steps: int) -> float:
        return self._ask(op="time", key=key, mode=mode, steps=steps)["seconds"]

    def close(self) -> dict:
        info = self._ask(op="info")
        self._proc.stdin.close()
        self._proc.wait()
        return info


def torch_worker(python: str, threads: int) -> tuple[TorchWorker | None, str]:
    """The worker for `python` (default: this interpreter if it has torch), or None and why not."""
    if not python:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            return None, "torch/torchvision not importable here; pass --torch_python=/path/to/python"
        python = sys.executable
    try:
        return TorchWorker(python, threads), ""
    except (OSError, RuntimeError) as e:
        return None, f"torch worker {python!r} failed: {e}"
