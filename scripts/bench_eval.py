"""Data-parallel evaluation: the same metric sets on 1 process and on N, timed and compared.

    python scripts/bench_eval.py [--worlds 1 2] [--hidden 512 --layers 8] [--out bench_results/eval.json]
    python scripts/bench_eval.py --device cuda --worlds 1 2     # process r on GPU r (mod the count)

Each world size starts its processes (``torch.distributed`` with gloo: the partial sums travel as
CPU tensors), builds the same random Llama over the embedded benchmark's vocabulary, and runs the
metric sets the way the evaluation callback does on N ranks (each its 1/N share, the sums
all-reduced): the synthetic probes (200 people), membership inference on the synthetic corpus,
and RWKU-style greedy generation (forget and neighbour questions of the embedded benchmark).
It reports the slowest rank's seconds per metric set, the speed-up over 1 process and the largest
difference of any metric from the 1-process value. Each process gets its own compute, as a rank
gets its own GPU: ``--threads`` CPU threads per process (default 1, so 2 processes use 2 cores
where 1 process used one), or GPU ``r`` (mod the count) with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rwku_files(directory: str, corpus: Any, per_level: int) -> str:
    """RWKU level-1 files from the embedded benchmark's questions (forget people / the others)."""
    forget = set(corpus.forget_people)
    for name, keep in (("forget_level1.json", True), ("neighbor_level1.json", False)):
        rows = [
            {"query": p.prompt, "answer": p.answer, "level": "1"}
            for p in corpus.probes_for("qa")
            if (p.person in forget) is keep
        ][:per_level]
        Path(directory, name).write_text(json.dumps(rows))
    return directory


def worker(rank: int, world: int, port: int, args: argparse.Namespace, rwku_dir: str, queue: Any) -> None:
    from lit_unlearn.benchmarks.synthetic import tiny_llama
    from lit_unlearn.benchmarks.synthetic.corpus import build_tokenizer, generate_corpus
    from lit_unlearn.eval import RWKU, SyntheticMembership, SyntheticProbes
    from lit_unlearn.partition import Partition

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def reduce_sum(values: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(values)
        return values

    def gather(value: Any) -> list[Any]:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, value)
        return parts

    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    corpus = generate_corpus(args.people)
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    model = tiny_llama(
        len(tokenizer), hidden=args.hidden, intermediate=3 * args.hidden, layers=args.layers,
        heads=max(1, args.hidden // 64), max_positions=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ).to(device).eval()  # fmt: skip
    metrics = {
        "probes": SyntheticProbes(num_people=args.people),
        "membership": SyntheticMembership(num_people=args.people, max_texts=args.mia_texts),
        "rwku": RWKU(rwku_dir, batch_size=16, max_new_tokens=args.new_tokens),
    }
    partition = Partition(
        rank, world, reduce_sum if world > 1 else None, gather=gather if world > 1 else None
    )
    seconds, values = {}, {}
    for name, metric in metrics.items():
        metric.setup(tokenizer, 128)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        values.update(metric.compute(model, tokenizer, partition))  # type: ignore[call-arg]  # data-parallel sets
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    queue.put((rank, seconds, values))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, rwku_dir: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, rwku_dir, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"bench_eval: a rank of world {world} exited with {proc.exitcode}")
    seconds = {k: max(r[1][k] for r in reports) for k in reports[0][1]}  # the slowest rank
    values = next(r[2] for r in reports if r[0] == 0)
    return {"world": world, "seconds": seconds, "values": values}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mia-texts", type=int, default=100)
    parser.add_argument("--rwku-items", type=int, default=96, help="questions per RWKU level file")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_results/eval.json"))
    args = parser.parse_args(argv)

    from lit_unlearn.benchmarks.synthetic.corpus import generate_corpus

    with tempfile.TemporaryDirectory() as rwku_dir:
        rwku_files(rwku_dir, generate_corpus(args.people), args.rwku_items)
        runs = [run_world(world, args, rwku_dir) for world in args.worlds]
    base = runs[0]
    for run in runs:
        run["speedup"] = {k: round(base["seconds"][k] / v, 2) for k, v in run["seconds"].items()}
        run["max_abs_diff_vs_first"] = max(abs(run["values"][k] - base["values"][k]) for k in base["values"])
        run["seconds"] = {k: round(v, 2) for k, v in run["seconds"].items()}
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {args.threads} thread(s) per process"
    )
    result = {
        "device": device,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
    }
    print(
        f"data-parallel evaluation on {device}; {args.hidden}x{args.layers} random Llama, {args.people} people"
    )
    header = (
        f"{'processes':<11}"
        + "".join(f"{k + ' s':>14}{'speed-up':>10}" for k in base["seconds"])
        + f"{'max |diff|':>12}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        cells = "".join(f"{run['seconds'][k]:>14.2f}{run['speedup'][k]:>9.2f}x" for k in base["seconds"])
        print(f"{run['world']:<11}{cells}{run['max_abs_diff_vs_first']:>12.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
