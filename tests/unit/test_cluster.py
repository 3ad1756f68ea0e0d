"""GPU detection, class mapping, `ray start` lines and `i2v-farm join` (no Ray cluster, no GPU)."""

from __future__ import annotations

import argparse
import json
import shlex
import stat
import subprocess

import pytest

from cluster import gpus as gpus_mod
from cluster import join as join_mod
from cluster.gpus import LocalGpu, parse_nvidia_smi, visible
from cluster.join import add_join_command, classify, head_address_with_port, ray_start_command
from cluster.simulated import SimulatedCluster
from cluster.vram_classes import HEAD_RESOURCE, default_classes, parse_classes

MiB = 1024**2

# What `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits` prints.
NVIDIA_SMI_OUTPUT = """\
0, NVIDIA GeForce RTX 3060, 12288
1, NVIDIA GeForce RTX 4090, 24564
2, NVIDIA A100-SXM4-40GB, 40960
3, NVIDIA H100 80GB HBM3, 81559
"""


def gpu(index: int, mib: int, name: str = "NVIDIA Test GPU") -> LocalGpu:
    return LocalGpu(index=index, name=name, memory_bytes=mib * MiB)


RTX3060, RTX4090, A100_40, H100 = parse_nvidia_smi(NVIDIA_SMI_OUTPUT)


def command_line(text: str) -> str:
    """The command (last line) of ray_start_command's answer."""
    return text.splitlines()[-1]


def resources_of(line: str) -> dict:
    args = shlex.split(line)
    (flag,) = [a for a in args if a.startswith("--resources=")]
    return json.loads(flag.split("=", 1)[1])


# --- nvidia-smi parsing and classes -------------------------------------------------------------

def test_parse_nvidia_smi_reads_index_name_and_memory():
    parsed = parse_nvidia_smi(NVIDIA_SMI_OUTPUT)
    assert [g.index for g in parsed] == [0, 1, 2, 3]
    assert parsed[1] == LocalGpu(1, "NVIDIA GeForce RTX 4090", 24564 * MiB)
    assert parsed[3].name == "NVIDIA H100 80GB HBM3"
    assert round(parsed[3].memory_gib, 1) == 79.6


def test_real_cards_map_to_their_classes():
    classes = default_classes()
    assert [classes.for_memory(g.memory_bytes).name for g in (RTX3060, RTX4090, A100_40, H100)] == [
        "12gb", "24gb", "40gb", "80gb"]
    # datacenter 24 GB cards with ECC expose 22.49 GiB (93.7%): still 24gb; 11 GiB is no class
    assert classes.for_memory(23028 * MiB).name == "24gb"  # A10G
    assert classes.for_memory(23034 * MiB).name == "24gb"  # L4
    assert classes.for_memory(11 * 1024 * MiB) is None


def test_parse_nvidia_smi_tolerates_commas_in_names_blank_lines_and_garbage():
    text = "\n0, NVIDIA RTX A6000, Ada, 49140\n1, NVIDIA T4, [N/A]\nNo devices were found\n  \n"
    parsed = parse_nvidia_smi(text)
    assert parsed == [LocalGpu(0, "NVIDIA RTX A6000, Ada", 49140 * MiB)]


def test_parse_nvidia_smi_of_nothing_is_no_gpus():
    assert parse_nvidia_smi("") == []


def test_cuda_visible_devices_narrows_the_list():
    all_gpus = [RTX3060, RTX4090, A100_40]
    assert visible(all_gpus, None) == all_gpus
    assert visible(all_gpus, "") == []
    assert visible(all_gpus, "2,0") == [A100_40, RTX3060]
    assert visible(all_gpus, "1,-1,2") == [RTX4090]  # CUDA stops at the first invalid entry
    assert visible(all_gpus, "GPU-5b1c2d3e") == all_gpus  # UUIDs cannot be matched by index


def test_detect_gpus_without_nvidia_smi_or_cuda_is_empty(monkeypatch):
    monkeypatch.setattr(gpus_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(gpus_mod, "_query_torch", lambda: [])
    assert gpus_mod.detect_gpus() == []


def test_detect_gpus_uses_nvidia_smi_and_respects_cuda_visible_devices(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 0, stdout=NVIDIA_SMI_OUTPUT, stderr="")

    monkeypatch.setattr(gpus_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus_mod.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert gpus_mod.detect_gpus() == [H100]
    cmd, kwargs = calls[0]
    assert cmd[1:] == ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
    assert kwargs["timeout"] > 0


def test_detect_gpus_falls_back_to_torch_when_nvidia_smi_fails(monkeypatch):
    monkeypatch.setattr(gpus_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 9, stdout="", stderr="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"))
    monkeypatch.setattr(gpus_mod, "_query_torch", lambda: [RTX4090])
    assert gpus_mod.detect_gpus() == [RTX4090]


def test_detect_gpus_survives_a_hanging_nvidia_smi(monkeypatch):
    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(gpus_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus_mod.subprocess, "run", hang)
    monkeypatch.setattr(gpus_mod, "_query_torch", lambda: [])
    assert gpus_mod.detect_gpus() == []


# --- ray start lines ----------------------------------------------------------------------------

def test_worker_line_for_one_gpu():
    line = ray_start_command([RTX4090], default_classes(), "10.0.0.5:6379")
    assert line == "ray start --address=10.0.0.5:6379 --num-gpus=1 --resources='{\"vram_24gb\": 1}'"


def test_worker_line_counts_gpus_of_one_class_and_adds_default_port():
    line = ray_start_command([gpu(0, 81559), gpu(1, 81559)], default_classes(), "head.internal")
    assert line == "ray start --address=head.internal:6379 --num-gpus=2 --resources='{\"vram_80gb\": 2}'"


def test_head_line_without_gpu():
    assert ray_start_command([], default_classes(), None) == (
        "ray start --head --port=6379 --resources='{\"i2v_head\": 1}'")


def test_head_line_with_a_gpu_offers_its_class_too():
    line = ray_start_command([RTX3060], default_classes(), None)
    assert line == "ray start --head --port=6379 --num-gpus=1 --resources='{\"i2v_head\": 1, \"vram_12gb\": 1}'"
    assert resources_of(line) == {HEAD_RESOURCE: 1, "vram_12gb": 1}


def test_mixed_node_gets_one_key_per_class_and_a_pinning_warning():
    text = ray_start_command([RTX3060, RTX4090, gpu(2, 24564)], default_classes(), "10.0.0.5:6379")
    lines = text.splitlines()
    line = lines[-1]
    assert line.startswith("ray start --address=10.0.0.5:6379 --num-gpus=3 ")
    assert resources_of(line) == {"vram_12gb": 1, "vram_24gb": 2}
    comments = lines[:-1]
    assert comments and all(c.startswith("#") for c in comments)
    warning = "\n".join(comments)
    assert "CUDA_VISIBLE_DEVICES=0 ray start" in warning
    assert "CUDA_VISIBLE_DEVICES=1,2 ray start" in warning
    assert "vram_24gb\": 2" in warning


def test_mixed_head_suggests_a_gpu_less_head_plus_one_raylet_per_class():
    text = ray_start_command([RTX4090, RTX3060], default_classes(), None)
    assert "#   ray start --head --port=6379 --num-gpus=0 --resources='{\"i2v_head\": 1}'" in text
    assert "#   CUDA_VISIBLE_DEVICES=1 ray start --address=THIS_HOST:6379 --num-gpus=1" in text
    assert resources_of(command_line(text)) == {HEAD_RESOURCE: 1, "vram_12gb": 1, "vram_24gb": 1}


def test_same_class_node_has_no_warning():
    assert "\n" not in ray_start_command([RTX4090, gpu(1, 24564)], default_classes(), "h:6379")


def test_too_small_gpu_is_refused_by_name():
    with pytest.raises(ValueError) as err:
        ray_start_command([gpu(0, 8192, "NVIDIA GeForce RTX 3070")], default_classes(), "h:6379")
    message = str(err.value)
    assert "GPU 0 (NVIDIA GeForce RTX 3070, 8.0 GiB)" in message
    assert "smallest VRAM class 12gb" in message


def test_too_small_gpu_among_good_ones_is_refused():
    with pytest.raises(ValueError, match="GPU 1 .*smaller than the smallest VRAM class 12gb"):
        ray_start_command([RTX4090, gpu(1, 6144)], default_classes(), "h:6379")


def test_head_with_only_a_too_small_gpu_starts_without_it():
    text = ray_start_command([gpu(0, 4096)], default_classes(), None)
    assert text.splitlines()[0].startswith("# GPU 0")
    assert command_line(text) == "ray start --head --port=6379 --num-gpus=0 --resources='{\"i2v_head\": 1}'"


def test_worker_without_gpu_is_refused():
    with pytest.raises(ValueError, match="no NVIDIA GPU"):
        ray_start_command([], default_classes(), "h:6379")


def test_custom_classes_change_the_mapping():
    classes = parse_classes([{"name": "16gb", "memory_gib": 16, "gpu": "rtx4090-24gb"},
                             {"name": "small", "memory_gib": 6, "gpu": "rtx3060-12gb"}])
    assert [c.name for _, c in classify([RTX3060, RTX4090], classes)] == ["small", "16gb"]


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5", "10.0.0.5:6379"), ("10.0.0.5:7000", "10.0.0.5:7000"),
    ("head.example.org", "head.example.org:6379"), ("[fd00::1]", "[fd00::1]:6379"),
    ("[fd00::1]:6380", "[fd00::1]:6380"),
])
def test_head_address_port(address, expected):
    assert head_address_with_port(address) == expected


@pytest.mark.parametrize("address", ["", "host:", "host:port", "host:70000", "a b:1", "h'; rm -rf /"])
def test_bad_head_address(address):
    with pytest.raises(ValueError):
        head_address_with_port(address)


# --- `i2v-farm join` through argparse -----------------------------------------------------------

@pytest.fixture(autouse=True)
def _token_file(tmp_path, monkeypatch):
    """`i2v-farm join` of these tests keeps its Ray token under tmp_path (never ./outputs)."""
    path = tmp_path / "farm" / "ray_token"
    monkeypatch.setenv("I2V_RAY_TOKEN_FILE", str(path))
    monkeypatch.delenv("I2V_RAY_AUTH", raising=False)
    return path


def auth_prefix(path) -> str:
    """What `i2v-farm join` puts before `ray start`: a private umask and the token's file."""
    return f"umask 077; RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path} "


def run_join(argv, detected, capsys):
    parser = argparse.ArgumentParser(prog="i2v-farm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_join_command(sub, detect=lambda: list(detected))
    args = parser.parse_args(["join", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_join_prints_gpus_and_the_worker_line(capsys):
    code, out, err = run_join(["--head", "10.0.0.5"], [RTX4090], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert any(l.split() == ["1", "NVIDIA", "GeForce", "RTX", "4090", "24.0", "GiB", "class", "24gb"] for l in lines)
    assert lines[-1] == auth_prefix(_token_file_of()) + (
        "ray start --address=10.0.0.5:6379 --num-gpus=1 --resources='{\"vram_24gb\": 1}'")


def test_join_lists_every_gpu_with_its_class(capsys):
    code, out, _ = run_join(["--head", "h:6379"], parse_nvidia_smi(NVIDIA_SMI_OUTPUT), capsys)
    assert code == 0
    for index, cls in enumerate(["12gb", "24gb", "40gb", "80gb"]):
        assert any(l.strip().startswith(f"{index} ") and l.endswith(f"class {cls}") for l in out.splitlines())
    assert "WARNING" in out
    assert resources_of(out.splitlines()[-1]) == {"vram_12gb": 1, "vram_24gb": 1, "vram_40gb": 1, "vram_80gb": 1}


def test_join_as_head_without_gpu_prints_the_head_line(capsys):
    code, out, err = run_join([], [], capsys)
    assert code == 0 and err == ""
    assert "No NVIDIA GPU" in out
    assert out.splitlines()[-1] == auth_prefix(_token_file_of()) + (
        "ray start --head --port=6379 --resources='{\"i2v_head\": 1}'")


def test_join_worker_without_gpu_exits_2(capsys):
    code, out, err = run_join(["--head", "10.0.0.5:6379"], [], capsys)
    assert code == 2
    assert err.startswith("error: no NVIDIA GPU found")
    assert "ray start" not in out


def test_join_with_a_too_small_gpu_exits_2_naming_it(capsys):
    code, out, err = run_join(["--head", "h"], [gpu(0, 6144, "NVIDIA GeForce GTX 1060")], capsys)
    assert code == 2
    assert "GPU 0 (NVIDIA GeForce GTX 1060, 6.0 GiB)" in err and "12gb" in err
    assert "too small" in out  # the listing still shows what was found


def test_join_reads_classes_from_env(monkeypatch, capsys):
    monkeypatch.setenv("I2V_CLASSES", json.dumps([{"name": "16gb", "memory_gib": 16, "gpu": "rtx4090-24gb"}]))
    code, out, _ = run_join(["--head", "h"], [RTX4090], capsys)
    assert code == 0
    assert resources_of(out.splitlines()[-1]) == {"vram_16gb": 1}


def test_join_with_broken_classes_env_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("I2V_CLASSES", "[{\"name\": \"x\"}]")
    code, _, err = run_join(["--head", "h"], [RTX4090], capsys)
    assert code == 2 and err.startswith("error: $I2V_CLASSES")


def test_join_uses_the_module_detector_by_default(monkeypatch, capsys):
    monkeypatch.setattr(join_mod, "detect_gpus", lambda: [H100])
    parser = argparse.ArgumentParser(prog="i2v-farm")
    add_join_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["join", "--head", "h:1234"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == auth_prefix(_token_file_of()) + (
        "ray start --address=h:1234 --num-gpus=1 --resources='{\"vram_80gb\": 1}'")


def _token_file_of() -> str:
    import os

    return os.environ["I2V_RAY_TOKEN_FILE"]


def test_join_head_creates_the_token_file_0600_and_never_prints_the_token(capsys, _token_file):
    code, out, err = run_join([], [], capsys)
    assert code == 0 and err == ""
    assert stat.S_IMODE(_token_file.stat().st_mode) == 0o600
    token = _token_file.read_text()
    assert len(token) == 64 and token not in out
    command = out.splitlines()[-1]
    assert command.startswith(f"umask 077; RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={_token_file} ray start --head")
    assert f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={_token_file}" in out  # for `ray job submit` shells
    # a second run keeps the token (joined nodes keep working)
    assert run_join([], [], capsys)[0] == 0 and _token_file.read_text() == token


def test_join_worker_says_how_to_copy_the_token_and_creates_nothing(capsys, _token_file):
    code, out, _ = run_join(["--head", "10.0.0.5"], [RTX4090], capsys)
    assert code == 0 and not _token_file.exists()
    assert "umask 077" in out and "chmod 600" in out and "scp HEAD:" in out and "not there yet" in out
    args = shlex.split(out.splitlines()[-1].removeprefix("umask 077; "))
    assert args[:3] == ["RAY_AUTH_MODE=token", f"RAY_AUTH_TOKEN_PATH={_token_file}", "ray"]


def test_join_token_file_flag_and_job_db_default(capsys, monkeypatch, tmp_path):
    code, out, _ = run_join(["--head", "h", "--token-file", str(tmp_path / "t")], [RTX4090], capsys)
    assert code == 0 and f"RAY_AUTH_TOKEN_PATH={tmp_path / 't'} ray start" in out.splitlines()[-1]
    monkeypatch.delenv("I2V_RAY_TOKEN_FILE")
    monkeypatch.setenv("I2V_JOB_DB", str(tmp_path / "state" / "jobs.sqlite3"))
    assert join_mod.default_token_file() == str(tmp_path / "state" / "ray_token")


def test_join_with_ray_auth_off_warns_and_prints_the_plain_line(capsys, monkeypatch):
    monkeypatch.setenv("I2V_RAY_AUTH", "off")
    code, out, _ = run_join(["--head", "10.0.0.5"], [RTX4090], capsys)
    assert code == 0 and "WARNING" in out and "RAY_AUTH" not in out.splitlines()[-1]
    assert out.splitlines()[-1] == "ray start --address=10.0.0.5:6379 --num-gpus=1 --resources='{\"vram_24gb\": 1}'"


def test_join_with_a_bad_head_address_exits_2(capsys):
    code, _, err = run_join(["--head", "host:notaport"], [RTX4090], capsys)
    assert code == 2 and "not HOST or HOST:PORT" in err


# --- SimulatedCluster before it starts (no Ray) ---------------------------------------------------

def test_simulated_cluster_takes_a_simulate_spec_or_counts():
    assert SimulatedCluster("12gb:2,24gb:1").counts == {"12gb": 2, "24gb": 1}
    assert SimulatedCluster({"80gb": 1}).counts == {"80gb": 1}
    assert SimulatedCluster().counts == {}


def test_simulated_cluster_refuses_unknown_classes():
    with pytest.raises(ValueError, match="unknown VRAM class '99gb'"):
        SimulatedCluster("99gb:1")
    with pytest.raises(KeyError, match="99gb"):
        SimulatedCluster({"99gb": 1})


def test_simulated_cluster_says_when_it_is_not_running():
    sim = SimulatedCluster("12gb:1")
    with pytest.raises(RuntimeError, match="not running"):
        _ = sim.address
    sim.shutdown()  # harmless before start
