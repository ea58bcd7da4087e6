"""The check before a GPU engine boots, on nvidia-smi's own output formats (no GPU on the test machines)."""

from __future__ import annotations

import pytest

from shortgpt_serve.errors import ServeError
from shortgpt_serve.serving.gpus import check, parse_gpus, parse_holders, visible, vllm_flag

# nvidia-smi --query-gpu=index,uuid,memory.free,memory.total --format=csv,noheader,nounits
GPUS = """0, GPU-1a2b3c4d-0000-1111-2222-333344445555, 81000, 81559
1, GPU-9f8e7d6c-0000-1111-2222-333344445555, 20000, 81559
"""
# nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits
APPS = """GPU-9f8e7d6c-0000-1111-2222-333344445555, 4242, /usr/bin/python3, 60000
GPU-9f8e7d6c-0000-1111-2222-333344445555, 77, /opt/other/trainer, 1500
"""


def test_nvidia_smi_output_is_read() -> None:
    gpus = parse_gpus(GPUS)
    assert [(g.index, g.free // 2**20, g.total // 2**20) for g in gpus] == [(0, 81000, 81559), (1, 20000, 81559)]
    holders = parse_holders(
        APPS + "GPU-9f8e7d6c-0000-1111-2222-333344445555, 99, y, [N/A]\nNo running processes found\n"
    )
    assert [(h.pid, h.name, h.used // 2**20) for h in holders] == [
        (4242, "python3", 60000),
        (77, "trainer", 1500),
        (99, "y", 0),
    ]


def test_flags_are_read_in_both_spellings() -> None:
    assert vllm_flag(["--tensor-parallel-size", "4"], "--tensor-parallel-size", "-tp") == "4"
    assert vllm_flag(["-tp=2", "--x"], "--tensor-parallel-size", "-tp") == "2"
    assert (
        vllm_flag(["--gpu-memory-utilization=0.5", "--gpu-memory-utilization", "0.6"], "--gpu-memory-utilization")
        == "0.6"
    )
    assert vllm_flag([], "--gpu-memory-utilization") is None


def test_cuda_visible_devices_picks_and_orders_gpus() -> None:
    gpus = parse_gpus(GPUS)
    assert [g.index for g in visible(gpus, "1,0")] == [1, 0]
    assert [g.index for g in visible(gpus, "GPU-9f8e")] == [1]
    assert [g.index for g in visible(gpus, "0,7,1")] == [0]  # CUDA stops at the first it cannot resolve
    assert visible(gpus, "") == []


def test_enough_free_memory_passes() -> None:
    check(parse_gpus(GPUS), [], [], "0")
    check(parse_gpus(GPUS), [], ["--gpu-memory-utilization", "0.2"], None)  # GPU 1 has 19.5 GiB of 79.6 free


def test_too_little_free_memory_names_what_holds_it_and_the_share_that_fits() -> None:
    with pytest.raises(ServeError) as err:
        check(parse_gpus(GPUS), parse_holders(APPS), [], "1")
    msg = str(err.value)
    assert msg.startswith("GPU 1 has 19.5 GiB free of 79.6 GiB, but vLLM takes 92% of it (73.3 GiB")
    assert "held by pid 4242 (python3, 58.6 GiB), pid 77 (trainer, 1.5 GiB)" in msg
    assert "-- --gpu-memory-utilization 0.22" in msg
    # The suggested share would pass.
    check(parse_gpus(GPUS), [], ["--gpu-memory-utilization", "0.22"], "1")


def test_tensor_parallel_beyond_the_visible_gpus_is_refused() -> None:
    with pytest.raises(ServeError, match=r"--tensor-parallel-size 4 needs 4 GPUs on this node but 2 are visible;"):
        check(parse_gpus(GPUS), [], ["--tensor-parallel-size", "4"], None)
    with pytest.raises(ServeError, match=r"but 1 are visible \(CUDA_VISIBLE_DEVICES=0\); lower it after --"):
        check(parse_gpus(GPUS), [], ["-tp", "2"], "0")
