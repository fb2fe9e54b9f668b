"""Neuron devices as the driver and neuron-ls see them (no torch import).

- ``neuron-ls --json-output`` prints a JSON array, one object per Neuron device, with
  ``neuron_device``, ``nc_count``, ``neuroncore_ids``, ``memory_size`` (bytes) and
  ``neuron_processes`` (Neuron LS User Guide, tools/neuron-sys-tools/neuron-ls.rst; the
  trn1.2xlarge shape is ``[{"neuron_device": 0, "nc_count": 2, "neuroncore_ids": [0, 1],
  "memory_size": 34359738368, ...}]``). Neuron 2.34 announces ``--output-format json``
  as its successor, so both flags are tried.
- The driver registers one character device per Neuron device, ``/dev/neuron<N>``, in
  the ``neuron`` char-device group (aws-neuron-driver ``ncdev_module_init``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

# Where the Neuron tools are installed (aws-neuronx-tools). The DLAMI puts this directory
# on PATH only in login shells, so a systemd service must look here itself.
NEURON_BIN_DIR = "/opt/aws/neuron/bin"

_DEVICE_NODE = re.compile(r"^neuron(\d+)$")


@dataclass(frozen=True)
class NeuronInfo:
    """What this machine offers: devices, NeuronCores, and why not when it offers none."""

    available: bool
    device_count: int
    core_count: int
    cores_per_device: int
    reason: str


def device_paths(dev_root: str | os.PathLike = "/dev") -> list[str]:
    """The Neuron device nodes (``/dev/neuron0``, ``/dev/neuron1``, ...) in index order."""
    try:
        names = os.listdir(dev_root)
    except OSError:
        return []
    found = [(int(m.group(1)), name) for name in names if (m := _DEVICE_NODE.match(name))]
    return [os.path.join(str(dev_root), name) for _, name in sorted(found)]


def find_neuron_ls(executable: str = "neuron-ls") -> str | None:
    """The neuron-ls to run: on PATH, else in /opt/aws/neuron/bin, else None."""
    return find_tool(executable)


def find_tool(executable: str) -> str | None:
    """A Neuron tool (neuron-ls, neuron-profile) to run: on PATH, else in
    /opt/aws/neuron/bin, else None."""
    if os.sep in executable:
        return executable if os.access(executable, os.X_OK) else None
    found = shutil.which(executable)
    if found:
        return found
    fallback = os.path.join(NEURON_BIN_DIR, executable)
    return fallback if os.access(fallback, os.X_OK) else None


def neuron_ls(executable: str = "neuron-ls", timeout: float = 10) -> list[dict] | None:
    """The devices ``neuron-ls --json-output`` reports, or None if it cannot be run or read.

    Neuron 2.34 replaces ``--json-output`` with ``--output-format json`` (which may wrap
    the device list in an object with a ``neuron_devices``-style key), so the new flag is
    tried when the old one fails.
    """
    path = find_neuron_ls(executable)
    if path is None:
        return None
    for flags in (["--json-output"], ["--output-format", "json"]):
        try:
            proc = subprocess.run([path, *flags], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        if proc.returncode != 0:
            continue
        devices = _parse_devices(proc.stdout)
        if devices is not None:
            return devices
    return None


def _parse_devices(text: str) -> list[dict] | None:
    """The device objects in neuron-ls JSON output (a list, or an object holding one)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and all(isinstance(d, dict) for d in v)]
        data = next((v for v in lists if any("neuron_device" in d for d in v)), None)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        return None
    return data


def device_core_count(device: dict) -> int:
    """NeuronCores of one neuron-ls device: ``nc_count``, else ``len(neuroncore_ids)``."""
    count = device.get("nc_count")
    if isinstance(count, int) and count > 0:
        return count
    ids = device.get("neuroncore_ids")
    return len(ids) if isinstance(ids, list) else 0


def detect(dev_root: str | os.PathLike = "/dev", executable: str = "neuron-ls") -> NeuronInfo:
    """Neuron devices as the driver and neuron-ls see them; available only if both agree.

    A path existing is not enough: ``available`` needs device nodes *and* neuron-ls
    reporting at least one NeuronCore. Whether torch_neuronx imports is for the worker to
    prove.
    """
    nodes = device_paths(dev_root)
    if not nodes:
        return NeuronInfo(False, 0, 0, 0, f"no Neuron device nodes in {dev_root} (neuron driver not loaded?)")
    devices = neuron_ls(executable)
    if devices is None:
        return NeuronInfo(False, len(nodes), 0, 0,
                          f"{len(nodes)} Neuron device node(s) but {executable} --json-output "
                          "could not be run or parsed (install aws-neuronx-tools)")
    cores = [device_core_count(d) for d in devices]
    total = sum(cores)
    if total == 0:
        return NeuronInfo(False, len(devices), 0, 0, f"{executable} reports no NeuronCores")
    per_device = max(cores)
    return NeuronInfo(True, len(devices), total, per_device,
                      f"{len(devices)} Neuron device(s), {total} NeuronCore(s)")
