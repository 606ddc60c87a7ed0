"""Retrieval-index benchmark: query time against index size, exact torch search and FAISS.

Random L2-normalised 256-d embeddings (the FROMAGe/GILL retrieval width) stand in for an image
store of 10^4 .. 10^6 images; queries are searched through ``RetrievalIndex.search`` (top-k,
results as ``RetrievedImage`` objects), one query at a time (a chat) and in batches (``mmgen
predict``). Backends:

    exact        torch matmul + topk on the CPU (the default backend)
    faiss-flat   FAISS IndexFlatIP: exact inner product
    faiss-ivf    FAISS IVF{sqrt(n)},Flat, nprobe 16: approximate; recall@k against exact reported

    python benchmarks/bench_index.py                           # 1e4, 1e5, 1e6; 1 thread
    python benchmarks/bench_index.py --sizes 10000 --threads 2

Prints milliseconds per query batch (median of --repeats) and index build time per backend.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmgen.inference.index import RetrievalIndex  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64], help="query batch sizes")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--nprobe", type=int, default=16)
    options = parser.parse_args()

    torch.set_num_threads(options.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(options.threads)
        backends = ["exact", "faiss-flat", "faiss-ivf"]
    except ImportError:
        print("faiss is not installed (pip install 'mmgen[faiss]'): exact search only")
        backends = ["exact"]

    print(f"dim {options.dim}, k {options.k}, {options.threads} thread(s), float32 in memory, "
          f"median of {options.repeats} runs")
    header = f"{'images':>9} {'backend':<11} {'build s':>8} " + " ".join(
        f"{f'{q} query ms':>13}" for q in options.queries) + f" {'recall@k':>9}"
    print(header)
    print("-" * len(header))
    g = torch.Generator().manual_seed(0)
    for n in options.sizes:
        embeddings = F.normalize(torch.randn(n, options.dim, generator=g), dim=-1)
        paths = [f"{i:07d}.png" for i in range(n)]
        queries = {q: F.normalize(torch.randn(q, options.dim, generator=g), dim=-1) for q in options.queries}
        exact_top = None
        for backend in backends:
            args = {}
            if backend == "faiss-flat":
                args = dict(backend="faiss", faiss_factory="Flat")
            elif backend == "faiss-ivf":
                args = dict(backend="faiss", faiss_factory=f"IVF{int(math.sqrt(n))},Flat", faiss_nprobe=options.nprobe)
            index = RetrievalIndex(embeddings, paths, **args)
            start = time.perf_counter()
            if index.backend == "faiss":
                index._faiss_index()  # build (and for IVF, train) before timing queries
            build = time.perf_counter() - start
            row = f"{n:>9,} {backend:<11} {build:>8.2f} "
            row += " ".join(f"{timed(lambda: index.search(queries[q], k=options.k), options.repeats):>13.2f}"
                            for q in options.queries)
            biggest = queries[max(options.queries)]
            top = [{h.path for h in hits} for hits in index.search(biggest, k=options.k)]
            if exact_top is None:
                exact_top = top
            recall = sum(len(a & b) for a, b in zip(top, exact_top)) / sum(len(b) for b in exact_top)
            print(row + f" {recall:>9.3f}", flush=True)
            del index
        del embeddings


if __name__ == "__main__":
    main()
