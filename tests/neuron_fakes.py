"""Fakes of the Neuron software for machines without Trainium (as the tests use them).

- FAKE_TORCH_NEURONX: a torch_neuronx whose import the template does like the real one's;
  it wraps torch_xla.device() so that each worker records, in $FAKE_NEURON_RECORD_DIR/<pid>.json,
  the environment its runtime starts with and whether the XLA runtime had started
  already, then runs on the CPU PJRT device. Started with the profiler's settings
  (warm_pool/neuron/profile.py) it writes what the Neuron runtime writes: the device
  profile as it starts (a NEFF and its NTFF, in <output dir>/i-0fake_pid_<pid>/), and the
  system profile (ntrace.pb, trace_info.pb) when its library's nrt_close() is called, as
  the real runtime's close would. With a file "refuse-profiler" in the record dir, a
  runtime with the profiler on does not start.
- FAKE_LIBNRT: that library (libnrt.so.1), a few lines of C built by `build_fake_libnrt`
  when a C compiler is there (without one there is no system profile).
- FAKE_NEURON_PROFILE: `neuron-profile view -d DIR --output-format perfetto` as the Neuron
  Profiler 2.0 guide describes it: system_profile.pftrace and one
  device_profile_model_<id>.pftrace per NEFF, in its cwd. It logs its calls (cwd|argv) and
  its environment beside itself; a "mode" file beside it makes it fail or hang.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

FAKE_TORCH_NEURONX = textwrap.dedent('''
    """Fake torch_neuronx: records what each worker's runtime start would see."""
    import ctypes, json, os
    import torch_xla
    import torch_xla.runtime

    RECORD_DIR = os.environ["FAKE_NEURON_RECORD_DIR"]
    _real_device = torch_xla.device
    __version__ = "2.9.0.2.0+fake"
    # The runtime's library (libnrt), loaded as the Neuron PJRT plugin would load it.
    _LIBNRT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "libnrt.so.1")
    _nrt = ctypes.CDLL(_LIBNRT, mode=ctypes.RTLD_GLOBAL) if os.path.exists(_LIBNRT) else None

    def _start_runtime():
        """What the Neuron runtime does as it starts with the profiler's settings."""
        if os.environ.get("NEURON_RT_INSPECT_ENABLE") != "1":
            return
        if os.path.exists(os.path.join(RECORD_DIR, "refuse-profiler")):
            raise RuntimeError("nrt_init: cannot allocate the profiler's trace buffers")
        out = os.path.join(os.environ.get("NEURON_RT_INSPECT_OUTPUT_DIR", "./output"),
                           f"i-0fake_pid_{os.getpid()}")
        os.makedirs(out, exist_ok=True)
        if os.environ.get("NEURON_RT_INSPECT_DEVICE_PROFILE") == "1":  # the first execution's
            with open(os.path.join(out, "neff_4242.neff"), "wb") as f:
                f.write(b"fake neff")
            with open(os.path.join(out, "4242_instid_0_vnc_0.ntff"), "wb") as f:
                f.write(b"fake ntff of core " + os.environ["NEURON_RT_VISIBLE_CORES"].encode())
        if _nrt is not None:
            _nrt.fake_nrt_start(out.encode())  # the system profile: written by nrt_close()

    def _other_of_my_uid(name):
        """The pid `name` if it is a live process of our uid other than us."""
        try:
            if not name.isdigit() or int(name) == os.getpid():
                return None
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                return None
            state = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None
        return int(name) if state != "Z" else None

    def _device(*args, **kwargs):
        path = os.path.join(RECORD_DIR, f"{os.getpid()}.json")
        if not os.path.exists(path):  # the first call: the one that starts the runtime
            record = {name: os.environ.get(name) for name in (
                "NEURON_RT_VISIBLE_CORES", "NEURON_PROCESS_TAG", "NEURON_RT_LOG_LEVEL",
                "NEURON_COMPILE_CACHE_URL", "NEURON_CC_FLAGS", "PJRT_DEVICE", "NEURON_RT_NUM_CORES",
                "NEURON_RT_INSPECT_ENABLE", "NEURON_RT_INSPECT_OUTPUT_DIR",
                "NEURON_RT_INSPECT_DEVICE_PROFILE")}
            record["runtime_started_before"] = bool(torch_xla._XLAC._xla_runtime_is_initialized())
            # What else of this worker's uid runs as its runtime starts (the core must be free).
            record["same_uid_processes"] = [p for p in map(_other_of_my_uid, os.listdir("/proc")) if p]
            _start_runtime()
            with open(path, "w") as f:
                json.dump(record, f)
        os.environ["PJRT_DEVICE"] = "CPU"  # the stand-in for the NeuronCore
        return _real_device(*args, **kwargs)

    torch_xla.device = _device
''')

FAKE_LIBNRT = textwrap.dedent("""
    #include <stdio.h>
    #include <string.h>
    static char out[4096];
    void fake_nrt_start(const char *dir) { snprintf(out, sizeof out, "%s", dir); }
    void nrt_close(void) {
        const char *names[] = {"ntrace.pb", "trace_info.pb"};
        char path[4200];
        for (int i = 0; out[0] && i < 2; i++) {
            snprintf(path, sizeof path, "%s/%s", out, names[i]);
            FILE *f = fopen(path, "w");
            if (f) { fputs("fake system profile", f); fclose(f); }
        }
        out[0] = 0;
    }
""")

FAKE_NEURON_PROFILE = textwrap.dedent("""\
    #!/bin/sh
    here=$(dirname "$0")
    echo "$PWD|$*" >> "$here/neuron-profile.calls"
    env > "$here/neuron-profile.env"
    mode=$(cat "$here/neuron-profile.mode" 2>/dev/null)
    if [ "$mode" = fail ]; then echo "ERRO[0000] cannot read the profile: bad magic" >&2; exit 3; fi
    if [ "$mode" = hang ]; then sleep 300 & echo $! > "$here/neuron-profile.child"; wait; fi
    [ "$1" = view ] && [ "$2" = -d ] || exit 2
    if [ -n "$(find "$3" -name ntrace.pb)" ]; then echo "perfetto: system" > system_profile.pftrace; fi
    for neff in $(find "$3" -name 'neff_*.neff'); do
        id=$(basename "$neff" .neff); echo "perfetto: $id" > "device_profile_model_${id#neff_}.pftrace"
    done
""")


def build_fake_libnrt(site: Path) -> bool:
    """The fake runtime library in `site` (beside the fake torch_neuronx); False without a
    C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    source = site / "fake_nrt.c"
    source.write_text(FAKE_LIBNRT)
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libnrt.so.1", "-o", str(site / "libnrt.so.1"),
                    str(source)], check=True)
    return True


def install_fake_neuron_profile(bin_dir: Path, mode: str = "") -> Path:
    """The fake neuron-profile in `bin_dir` (put it on PATH); `mode`: "", "fail" or "hang"."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "neuron-profile"
    tool.write_text(FAKE_NEURON_PROFILE)
    tool.chmod(0o755)
    (bin_dir / "neuron-profile.mode").write_text(mode)
    return tool
