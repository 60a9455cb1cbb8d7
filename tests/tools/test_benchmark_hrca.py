"""tools/benchmark_hrca.py: the memory tracker counts what it should, and a tiny run prints a well-formed
table and JSON in which HRCA's peak memory is below dense cross-attention's."""
import importlib.util
import json
import os
import subprocess
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOOL = os.path.join(REPO, "tools", "benchmark_hrca.py")
TINY = ["--size", "128", "--hidden-dim", "32", "--queries", "10", "--heads", "4", "--ffn", "64", "--num-classes", "4",
        "--dec-layers", "6"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_hrca", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tracker_peak_is_the_largest_set_of_live_new_storages():
    tool = _load_tool()
    weight = torch.ones(1000)
    with tool.StoragePeakTracker([weight]) as tracker:
        a = torch.zeros(256)  # 1 KiB
        b = torch.zeros(512)  # 2 KiB -> 3 KiB live
        del a
        c = weight.view(10, 100) * 2  # 4000 B new; the view of the excluded weight is not counted
        view = b[:10]  # a view allocates nothing
        del b, view
    assert tracker.peak == 1024 + 2048 + 4000 - 1024  # a freed before c was made
    assert tracker.current == 4000 and c.numel() == 1000


def test_tiny_run_outputs_table_and_json(tmp_path):
    out = tmp_path / "hrca.json"
    proc = subprocess.run([sys.executable, TOOL, *TINY, "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["variant", "1/4", "keys"] and set(lines[1]) == {"-"}
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["hrca", "dense"]
    for line, row in zip(lines[2:], rows):
        name, keys, mem, secs = line.split()
        assert name == row["variant"] and int(keys) == row["high_res_keys"]
        assert abs(float(mem) - row["peak_memory_mib"]) < 0.06 and abs(float(secs) - row["time_s"]) < 6e-4
    hrca, dense = rows
    # 128 x 128: HW_32 = 16 -> max(1, 16 // 32) = 1 cell of 8 x 8; dense sees all 32 x 32 tokens
    assert hrca["high_res_keys"] == 64 and dense["high_res_keys"] == 1024
    assert 0 < hrca["peak_memory_mib"] < dense["peak_memory_mib"]
    assert hrca["time_s"] > 0 and dense["time_s"] > 0
