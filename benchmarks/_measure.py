"""Measuring helpers the benchmarks share: wall time with peak RSS (`timed`), alternating rounds (`alternate`), the
load average, a markdown `table`, a `machine` record, and `residual_vq_from` (the plain vector-quantize-pytorch
baseline holding a `SpeechRVQ`'s codebooks). On CUDA, `timed` synchronises the device around the timed
call and reports the peak GPU memory allocated as `peak_gpu_mib` (reset before the call)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Give the heap memory freed so far back to the OS (glibc keeps it otherwise), so that a side's peak is not
    hidden by memory an earlier side freed and the allocator kept for reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then read low for later sides
        pass


def _cuda():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def timed(fn):
    """(result, {"seconds", "peak_mib"[, "peak_gpu_mib"]}): wall time of fn() and its peak RSS above the starting RSS
    (and, when CUDA is in use, the peak GPU memory allocated during the call)."""
    cuda = _cuda()
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
    _release_free_heap()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        result = fn()
        if cuda is not None:
            cuda.synchronize()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    stats = {"seconds": seconds, "peak_mib": round((peak[0] - base) / 2**20, 1)}
    if cuda is not None:
        stats["peak_gpu_mib"] = round(cuda.max_memory_allocated() / 2**20, 1)
    return result, stats


def alternate(sides: dict, rounds: int) -> dict:
    """{side: (result, stats)}: the sides take turns, `rounds` times, the order reversed every other round (A B, B A,
    ...); each side keeps its fastest round and its highest peak memory. On shared cores others' load only slows a
    side down, and turns spread the drift of that load over both."""
    runs: dict[str, list] = {name: [] for name in sides}
    for turn in range(rounds):
        for name in (list(sides) if turn % 2 == 0 else list(reversed(sides))):
            runs[name].append(timed(sides[name]))
    best = {}
    for name, measured in runs.items():
        result, fastest = min(measured, key=lambda rm: rm[1]["seconds"])
        best[name] = (result, {**fastest, "peak_mib": max(m["peak_mib"] for _, m in measured), "rounds": len(measured)})
        if "peak_gpu_mib" in fastest:
            best[name][1]["peak_gpu_mib"] = max(m.get("peak_gpu_mib", 0.0) for _, m in measured)
    return best


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform()}


# ------------------------------------------------------------------------------------------------------ baselines

def residual_vq_from(rvq):
    """A fresh vector-quantize-pytorch `ResidualVQ` holding `rvq`'s codebooks (what the model card's recipe builds)."""
    from vector_quantize_pytorch import ResidualVQ

    plain = ResidualVQ(dim=rvq.dim, num_quantizers=rvq.num_quantizers, codebook_size=rvq.codebook_size, kmeans_init=True)
    for ours, theirs in zip(rvq.rvq.layers, plain.layers):
        for name in ("embed", "embed_avg", "cluster_size", "initted"):
            getattr(theirs._codebook, name).data.copy_(getattr(ours._codebook, name).data)
    return plain.eval()


def encode_comparison(rvq, x, rounds: int) -> dict:
    """`SpeechRVQ.encode` vs `ResidualVQ.forward` vs the fp32 matmul roofline (the same FLOPs as plain matmuls of the
    encode path's shapes, (chunk x dim) @ (dim x codebook)) on the vectors `x`, in alternating turns: vectors/s, GFLOP/s,
    the share of the roofline, the speed-up and the share of rows with identical codes."""
    import torch

    plain = residual_vq_from(rvq)
    n, chunk = len(x), rvq.cfg.encode_chunk
    rvq.encode(x[:chunk])  # warm-up
    a, b = torch.randn(chunk, rvq.dim), torch.randn(rvq.codebook_size, rvq.dim)
    a @ b.t()
    matmuls = rvq.num_quantizers * -(-n // chunk)

    def roofline() -> None:
        for _ in range(matmuls):
            a @ b.t()

    def residual_vq():
        with torch.no_grad():
            return plain(rvq.standardize(x).unsqueeze(0))

    runs = alternate({"ours": lambda: rvq.encode(x), "residualvq": residual_vq, "roofline": roofline}, rounds)
    (codes, ours), ((_, ref, _), theirs), (_, roof) = runs["ours"], runs["residualvq"], runs["roofline"]
    flop = rvq.num_quantizers * 2 * rvq.dim * rvq.codebook_size
    rate = {"ours": n / ours["seconds"], "residualvq": n / theirs["seconds"],
            "roofline": matmuls * chunk / rvq.num_quantizers / roof["seconds"]}
    return {"vectors": n, "chunk": chunk, "threads": torch.get_num_threads(), "flop_per_vector": flop,
            **{k: {**s, "vectors_per_s": round(rate[k]), "gflops": round(rate[k] * flop / 1e9, 1)}
               for k, s in (("ours", ours), ("residualvq", theirs), ("roofline", roof))},
            "share_of_roofline": round(rate["ours"] / rate["roofline"], 3),
            "speedup_vs_residualvq": round(rate["ours"] / rate["residualvq"], 2),
            "identical_rows": float((codes == ref[0]).all(1).float().mean())}
