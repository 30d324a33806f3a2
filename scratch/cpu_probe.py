"""Does a second busy process slow this one's host work? Pure-Python spin and CUDA launch loops, alone
and concurrent, pinned and unpinned."""
import json, os, sys, time, multiprocessing as mp

def spin(seconds=1.0):
    n = 0; end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n

def launches(device, count=20000):
    import torch
    torch.cuda.set_device(device)
    x = torch.randn(1024, device=device)
    for _ in range(2000): x.add_(1.0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count): x.add_(1.0)
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return count / host  # launches per second of host time

def worker(kind, cpu, device, barrier, out):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind == "launch":
        import torch; torch.cuda.init(); torch.zeros(1, device=device)
    barrier.wait()
    out.put((cpu, device, spin(1.0) if kind == "spin" else launches(device)))

def trial(kind, placements):
    ctx = mp.get_context("spawn"); barrier = ctx.Barrier(len(placements)); out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, cpu, dev, barrier, out)) for cpu, dev in placements]
    for p in procs: p.start()
    results = [out.get() for _ in procs]
    for p in procs: p.join()
    return [r[2] for r in results]

if __name__ == "__main__":
    report = {}
    report["spin_alone"] = trial("spin", [(None, 0)])
    for other in (1, 2, 8, 16, 17, 31):
        report[f"spin_pinned_0_and_{other}"] = trial("spin", [(0, 0), (other, 0)])
    report["spin_2_unpinned"] = trial("spin", [(None, 0)] * 2)
    report["spin_16_unpinned"] = trial("spin", [(None, 0)] * 16)
    report["launch_alone"] = trial("launch", [(None, 0)])
    report["launch_2_gpus"] = trial("launch", [(None, 0), (None, 1)])
    report["launch_2_gpus_pinned_0_16"] = trial("launch", [(0, 0), (16, 1)])
    report["launch_2_gpus_pinned_0_1"] = trial("launch", [(0, 0), (1, 1)])
    for k, v in report.items(): print(k, [round(x) for x in v])
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(report, open(os.path.join(os.environ.get("OUT", "/tmp"), "cpu_probe.json"), "w"), indent=1)
