"""torchvision's `mobilenet_v3_small`, timed in a subprocess of any interpreter that has torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

_TORCH_WORKER = r"""
import contextlib, json, resource, sys, time
import torch, torchvision
torch.set_num_threads(int(sys.argv[1]))
models = {}
def train(m, opt, lossf, x, y, amp):
    m.train()
    opt.zero_grad(set_to_none=True)
    with amp():
        loss = lossf(m(x), y)
    loss.backward()
    opt.step()
def evaluate(m, opt, lossf, x, y, amp):
    m.eval()
    with torch.no_grad(), amp():
        m(x)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "setup":
        torch.manual_seed(0)
        dev, amp = torch.device(req["device"]), req["amp"]
        # AMP as PyTorch recommends it: autocast to `amp` with channels-last tensors.
        fmt = torch.channels_last if amp else torch.contiguous_format
        m = torchvision.models.mobilenet_v3_small(num_classes=req["classes"]).to(dev, memory_format=fmt)
        x = torch.randn(req["batch"], 3, req["res"], req["res"], device=dev).to(memory_format=fmt)
        y = torch.randint(0, req["classes"], (req["batch"],), device=dev)
        ctx = ((lambda: torch.autocast(dev.type, dtype=getattr(torch, amp))) if amp
               else contextlib.nullcontext)
        models[req["key"]] = (m, torch.optim.Adam(m.parameters(), 1e-4),
                              torch.nn.CrossEntropyLoss(label_smoothing=0.1), x, y, ctx)
        out = {"params": sum(p.numel() for p in m.parameters())}
    elif req["op"] == "time":
        fn = train if req["mode"] == "train" else evaluate
        args = models[req["key"]]
        t = time.perf_counter()
        for _ in range(req["steps"]):
            fn(*args)
        if args[3].is_cuda:
            torch.cuda.synchronize()
        out = {"seconds": time.perf_counter() - t}
    else:
        out = {"torch": torch.__version__, "torchvision": torchvision.__version__,
               "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(out), flush=True)
"""


class TorchWorker:
    """torchvision's model in a subprocess (any interpreter with torch), timed on request."""

    def __init__(self, python: str, threads: int):
        self.python = python
        self._proc = subprocess.Popen(
            [python, "-c", _TORCH_WORKER, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._ask(op="info")

    def _ask(self, **req) -> dict:
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"The torch worker ({self.python}) exited (rc {self._proc.wait()}); see stderr above")
        return json.loads(line)

    def setup(
        self, key: str, res: int, batch: int, classes: int, *, device: str = "cpu", amp: str | None = None
    ) -> int:
        """Builds the model on torch `device`; `amp` (e.g. "bfloat16") autocasts with channels-last tensors."""
        return self._ask(op="setup", key=key, res=res, batch=batch, classes=classes, device=device, amp=amp)["params"]

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
