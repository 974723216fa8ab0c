"""``sterling bench tiers``: one catalog served with every list resident, with the planner's
split, and with every list memory-mapped — QPS, p99 and the planner's prediction for each.

Queries come from a skewed workload (cluster popularity follows a Zipf law,
as real traffic does); the build measures each list's probe frequency on a
separate sample of it. All three configurations run the same searches and
must return the same ids and scores (so recall is equal by construction; it
is measured against fp32 brute force and reported). The peer is the same
catalog's untiered in-memory index, timed in the same run.

Slow-tier cache: ``cold`` evicts the artifact's pages from the page cache
before every batch (``posix_fadvise(POSIX_FADV_DONTNEED)``, outside the
timer; it cannot evict the pages the process still maps, i.e. the slow
tier's current window, which is what a real server keeps), so slow lists
are read from the disk; ``warm`` leaves them in the page cache (not in the
process's RSS once released: they are faulted in again). Writing
/proc/sys/vm/drop_caches once at the start is tried too and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiers", help="all-resident vs the planner's split vs all memory-mapped (CPU)")
    p.add_argument("--items", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queries", type=int, default=2048, help="timed queries per run")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of cluster popularity")
    p.add_argument("--fast-fraction", type=float, default=0.25,
                   help="DRAM budget for the planner's split, as a fraction of the lists' bytes")
    p.add_argument("--cold-window-mb", type=float, default=8.0)
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per configuration (best kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="where the artifact is written (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write all rows as one JSON document")
    p.add_argument("--profile", type=Path, default=None,
                   help="machine profile for the planner's prediction (sterling plan --calibrate); default: "
                        "measured first in a separate process, on its own synthetic data")
    p.add_argument("--no-profile", action="store_true", help="predict with the built-in CPU constants")
    p.add_argument("--slow-advice", choices=("plan", "normal", "random"), default="plan",
                   help="how a cold fault reads the slow tier: the plan's choice (default), the kernel's "
                        "read-around (normal), or one page a fault (random: MADV_RANDOM)")
    p.add_argument("--staging-mb", type=float, default=64.0, help="GPU staging buffer for the stream mode")
    p.set_defaults(func=run)


def _skewed_queries(cat, nq: int, zipf: float, seed: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    C, dim = cat.centers.shape
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(7))  # which clusters are popular
    p = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** zipf
    c = perm[torch.multinomial(p / p.sum(), nq, replacement=True, generator=g)]
    return F.normalize(cat.centers[c] + 0.8 * torch.randn(nq, dim, generator=g) / dim**0.5, dim=1)


def _drop_caches() -> str:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches written"
    except OSError as e:
        return f"drop_caches not permitted ({e.strerror}); posix_fadvise(DONTNEED) on the artifact used"


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sterling.model import IndexConfig, ItemIndex, build_index
    from sterling.model.synthetic import synthetic_catalog
    from sterling.model.tiers import artifact_list_stats
    from sterling.planner import IndexModelConfig, PlanTargets, make_topology, plan
    from sterling.planner.profile import MachineProfile
    from sterling.planner.tiers import ListStats, slow_reads_per_batch, split_lists

    profile, profile_note = None, "built-in CPU constants"
    if not args.no_profile:
        profile_path = args.profile
        if profile_path is None:  # measured before, in another process, on other data
            profile_path = Path(tempfile.mkdtemp(prefix="sterling-profile-")) / "profile.json"
            subprocess.run([sys.executable, "-m", "sterling.launch.cli", "plan", "--calibrate", "--profile",
                            str(profile_path), "--threads", str(args.threads)], check=True,
                           stdout=subprocess.DEVNULL)
            profile_note = f"calibrated in a separate process before the run ({profile_path})"
        else:
            profile_note = f"profile {profile_path}"
        profile = MachineProfile.load(profile_path)
        print(json.dumps({"bench": "tiers", "profile": dataclasses.asdict(profile), "note": profile_note}),
              flush=True)

    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    t0 = time.perf_counter()
    cat = synthetic_catalog(args.items, args.dim, seed=0, with_attributes=True)
    sample = _skewed_queries(cat, 4096, args.zipf, seed=11)
    xq = _skewed_queries(cat, args.queries, args.zipf, seed=12)
    base = build_index(cat.embeddings, ids=cat.ids, attributes=cat.attributes,
                       config=IndexConfig(nlist=args.nlist, nprobe=args.nprobe), query_sample=sample)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sterling-bench-tiers-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "tiers.st"
    base.save(path)
    build_s = time.perf_counter() - t0

    d = artifact_list_stats(path)
    stats = ListStats.from_artifact(d)
    total = int(stats.list_bytes.sum())
    window = int(args.cold_window_mb * 2**20)
    cfg = IndexModelConfig(items=base.capacity, dim=args.dim, nlist=args.nlist, nprobe=args.nprobe, k0=args.k,
                           k=args.k, batch=args.batch, attrs_per_item=0, cache_dim=0, tower_params=0)
    dram = int((args.fast_fraction * total + window + stats.always) / 0.8) + 1
    topo = make_topology("cpu", host_dram_bytes=dram)
    free = PlanTargets(p99_ms=None)  # predict every layout; the bench measures, it does not gate
    forced = None if args.slow_advice == "plan" else args.slow_advice
    split_plan = plan(cfg, topo, free, list_stats=stats, cold_window=window, profile=profile, slow_advice=forced)
    fast_split = np.array([c == "1" for c in split_plan.devices[0].tiers["fast"]])
    configs = {
        "all fast": np.ones(args.nlist, dtype=bool),
        "planner split": fast_split,
        "all slow": np.zeros(args.nlist, dtype=bool),
    }
    big = make_topology("cpu")
    predicted, planned_bytes, slow_reads, advice = {}, {}, {}, {}
    for name, mask in configs.items():
        p = plan(cfg, big if name == "all fast" else topo, free, list_stats=stats, cold_window=window,
                 list_fast=mask, profile=profile, slow_advice=forced)
        predicted[name] = p.cost.latency_ms
        advice[name] = p.devices[0].tiers.get("slow_advice", "normal")  # each layout served as planned
        planned_bytes[name] = {t: v for t, v in p.cost.bytes_per_tier.items() if v}
        sp = split_lists(stats, 0, fast=mask, cold_window=window)
        slow_reads[name] = slow_reads_per_batch(sp, stats, batch=args.batch, k=args.k)

    # recall of the (shared) answers against fp32 brute force
    exact = (xq @ cat.embeddings.T).topk(args.k, dim=1).indices
    ref_s, ref_i = base.search(xq, k=args.k, nprobe=args.nprobe)
    found = ref_i.numpy()
    want = cat.ids.numpy()[exact.numpy()]
    recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, want)]))

    modes = ("cold", "warm") if args.cache == "both" else (args.cache,)
    cache_note = _drop_caches() if "cold" in modes else "page cache left alone (warm only)"
    fd = os.open(path, os.O_RDONLY)
    batches = [slice(s, min(s + args.batch, args.queries)) for s in range(0, args.queries, args.batch)]

    def evict() -> None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def timed(index, mode: str | None) -> tuple[list[float], torch.Tensor, torch.Tensor]:
        lat, out_s, out_i = [], [], []
        for rows in batches:
            if mode == "cold":
                evict()
            t = time.perf_counter()
            s, i = index.search(xq[rows], k=args.k, nprobe=args.nprobe)  # releases its window itself
            lat.append(time.perf_counter() - t)
            out_s.append(s)
            out_i.append(i)
        return lat, torch.cat(out_s), torch.cat(out_i)

    indexes = {}
    for name, mask in configs.items():
        ix = ItemIndex.load(path, verify=False, tiers=False)
        ix.apply_tiers(mask, cold_window=window, slow_advice=advice[name])
        indexes[name] = ix
    rows: list[dict] = []
    best: dict[tuple[str, str], list[float]] = {}
    same = True
    for mode in modes:
        for _ in range(max(1, args.repeat)):
            lat, s, i = timed(base, None)  # the peer: untiered, in memory
            key = ("untiered in-memory (peer)", mode)
            if key not in best or sum(lat) < sum(best[key]):
                best[key] = lat
            for name, ix in indexes.items():
                for other in indexes.values():  # only this layout's own window survives the evictions
                    if other is not ix:
                        other.tiering.release(other.tier_tensors())
                lat, s2, i2 = timed(ix, mode)
                same &= bool(torch.equal(s2, s) and torch.equal(i2, i))
                key = (name, mode)
                if key not in best or sum(lat) < sum(best[key]):
                    best[key] = lat
    os.close(fd)
    fast_mean = {mode: float(np.mean(best[("all fast", mode)])) * 1e3 for mode in modes}
    for (name, mode), lat in best.items():
        arr = np.array(lat) * 1e3
        mean = float(arr.mean())
        row = {
            "bench": "tiers", "config": name, "cache": mode, "items": args.items, "dim": args.dim,
            "nlist": args.nlist, "nprobe": args.nprobe, "k": args.k, "batch": args.batch,
            "qps": args.queries / (arr.sum() / 1e3), "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)), "mean_batch_ms": mean, f"recall@{args.k}": recall,
            "threads": args.threads,
        }
        if name in indexes:
            st = indexes[name].tiering
            lb = stats.list_bytes
            row.update({
                "fast_lists": int(st.fast.sum()), "fast_mb": float(lb[st.fast].sum() / 1e6),
                "slow_mb": float(lb[~st.fast].sum() / 1e6),
                "probe_share_fast": float(stats.probe_freq[st.fast].sum() / stats.probe_freq.sum()),
                "predicted_batch_ms": predicted[name],
                "planned_bytes_per_batch": planned_bytes[name],
                "prediction_error": (predicted[name] - mean) / mean,
                "prediction_error_pct": round(100 * (predicted[name] - mean) / mean, 1),
                "slow_reads_per_batch": slow_reads[name],
                # the tier model alone: measured all-fast batch + what the planner adds for the slow tier
                "tier_model_batch_ms": fast_mean[mode] + predicted[name] - predicted["all fast"],
                "tier_model_error": (fast_mean[mode] + predicted[name] - predicted["all fast"] - mean) / mean,
                "fast_resident_mb": st.fast_resident_bytes() / 1e6,
                "slow_advice": st.advice,
            })
        rows.append(row)
        print(json.dumps(row), flush=True)
    for mode in modes:
        meas = float(np.mean(best[("planner split", mode)])) * 1e3
        print(f"planner split ({mode} cache, slow tier read {advice['planner split']}): "
              f"predicted {predicted['planner split']:.2f} ms/batch, "
              f"measured {meas:.2f} ms, error {100 * (predicted['planner split'] - meas) / meas:+.1f}% "
              f"({profile_note}; the prediction assumes a cold page cache)", flush=True)
    gpu_rows, gpu_same = _gpu_section(args, base, xq, fast_split, batches) if torch.cuda.is_available() else ([], True)
    rows += gpu_rows
    same &= gpu_same
    summary = {"bench": "tiers", "identical_answers": same, "cache_note": cache_note, "build_s": build_s,
               "profile": profile_note, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else
               "no CUDA device in this process: GPU section skipped",
               "artifact_mb": path.stat().st_size / 1e6, "lists_mb": total / 1e6,
               "planned_resident_mb": split_plan.devices[0].tiers["resident_bytes"] / 1e6}
    print(json.dumps(summary), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    if args.workdir is None:
        path.unlink(missing_ok=True)
        work.rmdir()
    return 0 if same else 1


def _gpu_section(args, base, xq, fast_split, batches):
    """HBM vs pinned host (stream, zero-copy) on the CUDA device: the whole index in HBM is the peer."""
    import numpy as np
    import torch

    from sterling.model.device_tiers import TierModeError

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    staging = int(args.staging_mb * 2**20)
    configs = {"all HBM (peer)": base.cuda()}
    for split, mask in (("planner split", fast_split), ("all pinned host", np.zeros(base.nlist, dtype=bool))):
        for mode in ("stream", "zero-copy"):
            try:
                configs[f"{split}, {mode}"] = base.to_tiers(mask, device="cuda", mode=mode, staging_bytes=staging)
            except TierModeError as e:
                print(json.dumps({"bench": "tiers", "device": name, "config": f"{split}, {mode}",
                                  "skipped": str(e)}), flush=True)
    xd = xq.to(dev)

    def timed(index):
        lat, out_s, out_i = [], [], []
        for rows in batches:
            torch.cuda.synchronize()
            t = time.perf_counter()
            s, i = index.search(xd[rows], k=args.k, nprobe=args.nprobe)
            torch.cuda.synchronize()
            lat.append(time.perf_counter() - t)
            out_s.append(s)
            out_i.append(i)
        return lat, torch.cat(out_s), torch.cat(out_i)

    for index in configs.values():
        timed(index)  # warm-up: Triton compiles, staging buffers touched
    best: dict[str, list[float]] = {}
    same = True
    for _ in range(max(1, args.repeat)):
        ref = None
        for cname, index in configs.items():
            lat, s, i = timed(index)
            if ref is None:
                ref = (s, i)
            else:
                same &= bool(torch.equal(s, ref[0]) and torch.equal(i, ref[1]))
            if cname not in best or sum(lat) < sum(best[cname]):
                best[cname] = lat
    rows = []
    peer = float(np.mean(best["all HBM (peer)"]))
    for cname, lat in best.items():
        arr = np.array(lat) * 1e3
        row = {"bench": "tiers", "device": name, "config": cname, "qps": args.queries / (arr.sum() / 1e3),
               "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
               "mean_batch_ms": float(arr.mean()), "vs_hbm": peer / float(np.mean(lat)), "batch": args.batch}
        index = configs[cname]
        if hasattr(index, "stage_stats"):
            row.update({"hot_mb": index.hot_bytes() / 1e6, "cold_pinned_mb": index.cold_bytes() / 1e6,
                        "staging_mb": index.staging_bytes() / 1e6, "chunks": index.stage_stats.chunks,
                        "staged_mb": index.stage_stats.bytes_staged / 1e6})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "tiers", "device": name, "identical_answers": same}), flush=True)
    return rows, same
