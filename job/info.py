"""`mnist-job info`: what this job sees where it runs. The first thing to run in
a pod that misbehaves: versions, CPUs and their cgroup limit, GPUs (and why
TensorFlow may not see one), the strategy `auto` would pick, the cluster
derived from TF_CONFIG or the Indexed Job, the MNIST cache, the output dir, and the two
CUDA tools XLA needs to compile for a GPU (ptxas and libdevice).

Nothing here changes anything: no download, no directory created, no file
left behind.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shlex
import shutil
from importlib.util import find_spec
from pathlib import Path

from job.artifacts import unwritable_reason
from job.config import TrainConfig
from job.errors import JobError

# Variables that decide what the job sees; shown when set.
ENV_VARS = (
    "TF_CONFIG",
    "JOB_COMPLETION_INDEX",
    "HOSTNAME",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "TF_XLA_FLAGS",
    "XLA_FLAGS",
    "TF_ENABLE_ONEDNN_OPTS",
    "KERAS_HOME",
    "MPLCONFIGDIR",
    "HOME",
)


def collect(config: TrainConfig, environ=os.environ) -> dict:
    """Everything `info` reports, as a JSON-ready dict."""
    from job import __version__
    from job.strategy import choose_strategy, cpu_limit, cpu_threads

    tensorflow = _tensorflow()
    cluster, cluster_report = _cluster(config, environ)
    strategy = None
    if cluster is not None and "error" not in tensorflow:
        strategy = choose_strategy("auto", cluster, len(tensorflow["gpus"]))
    return {
        "versions": {
            "python": platform.python_version(),
            "mnist_job": __version__,
            **tensorflow.pop("versions", {}),
        },
        "tensorflow": tensorflow,
        "cpus": {
            "os_count": os.cpu_count(),
            "usable": len(os.sched_getaffinity(0)),
            "cgroup_limit": cpu_limit(),
            "threads_used": cpu_threads(),
        },
        "nvidia_devices": sorted(glob.glob("/dev/nvidia[0-9]*")),
        "xla_gpu_tools": xla_gpu_tools(environ),
        "strategy_auto": strategy,
        "cluster": cluster_report,
        "data": _data(config.data_dir),
        "compile_cache": _compile_cache(config.compile_cache),
        "output_dir": _writable(config.output_dir),
        "environment": {name: environ[name] for name in ENV_VARS if name in environ},
    }


def text(info: dict) -> str:
    """The report for people: one `key: value` line each, grouped."""
    tf = info["tensorflow"]
    cpus = info["cpus"]
    cluster = info["cluster"]
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())]
    if "error" in tf:
        lines.append(f"tensorflow: cannot import: {tf['error']}")
    else:
        build = "CUDA build" if tf["cuda_build"] else "CPU-only build"
        if tf["cuda_build"]:
            build += f" (CUDA {tf['cuda_version']}, cuDNN {tf['cudnn_version']})"
        lines.append(f"tensorflow: {build}")
        lines.append("gpus: " + (", ".join(g["name"] for g in tf["gpus"]) or "none visible"))
    lines.append(
        f"cpus: {cpus['usable']} usable of {cpus['os_count']}, cgroup limit "
        f"{cpus['cgroup_limit'] or 'none'}; TensorFlow gets {cpus['threads_used']} threads"
    )
    if info["nvidia_devices"]:
        lines.append("nvidia devices: " + ", ".join(info["nvidia_devices"]))
    tools = info["xla_gpu_tools"]
    lines.append(f"ptxas: {tools['ptxas'] or 'not found'}")
    lines.append(f"libdevice: {tools['libdevice'] or 'not found'}")
    lines.append(f"strategy (auto): {info['strategy_auto'] or 'unknown'}")
    if "error" in cluster:
        lines.append(f"cluster: error: {cluster['error']}")
    elif cluster["source"] == "single":
        lines.append("cluster: single worker (no TF_CONFIG, --num-workers 1)")
    else:
        lines.append(
            f"cluster: {cluster['workers']} workers from {cluster['source']}, this is "
            f"{cluster['task_type']} {cluster['task_index']} (chief: {cluster['is_chief']})"
        )
    data = info["data"]
    lines.append(f"data: {data['status']} ({data['path']})" + _detail(data))
    cache = info["compile_cache"]
    if cache is None:
        lines.append("compile cache: off")
    else:
        writable = "writable" if cache["writable"] else "NOT writable: every run compiles"
        lines.append(
            f"compile cache: {cache['path']} {writable}, {cache['programs']} compiled "
            f"program(s), {cache['megabytes']:.1f} MB" + _detail(cache)
        )
    out = info["output_dir"]
    writable = "writable" if out["writable"] else "NOT writable"
    lines.append(f"output dir: {out['path']} {writable}" + _detail(out))
    lines += [f"env {name}={value}" for name, value in info["environment"].items()]
    lines += [f"hint: {hint}" for hint in hints(info)]
    return "\n".join(lines)


def hints(info: dict) -> list[str]:
    """Likely causes of the commonest surprises."""
    tf = info["tensorflow"]
    found = []
    if info["nvidia_devices"] and "error" not in tf and not tf["gpus"]:
        if not tf["cuda_build"]:
            found.append(
                "an NVIDIA device is present but this TensorFlow is a CPU-only build "
                "(use the CUDA image or install mnist-job[cuda])"
            )
        else:
            found.append(
                "an NVIDIA device is present but TensorFlow sees no GPU: check "
                "CUDA_VISIBLE_DEVICES, the driver version, and the CUDA libraries on "
                "LD_LIBRARY_PATH"
            )
    tools = info["xla_gpu_tools"]
    if "error" not in tf and tf["cuda_build"] and not (tools["ptxas"] and tools["libdevice"]):
        found.append(
            "XLA cannot compile for a GPU without ptxas and libdevice (jit_compile fails "
            "with 'libdevice not found'): install nvidia-cuda-nvcc-cu12, put its bin/ on "
            "PATH and set XLA_FLAGS=--xla_gpu_cuda_data_dir=DIR, DIR holding "
            f"{LIBDEVICE}"
        )
    if not info["output_dir"]["writable"]:
        found.append("train will fail: choose a writable --output-dir or mount a volume there")
    return found


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2, default=str)


LIBDEVICE = "nvvm/libdevice/libdevice.10.bc"
CUDA_DATA_DIR_FLAG = "--xla_gpu_cuda_data_dir"


def xla_gpu_tools(environ=os.environ, cuda_roots: list[Path] | None = None) -> dict:
    """Where XLA would find ptxas and libdevice for GPU compiles, as it looks
    for them (None where it would not): first the dir that XLA_FLAGS'
    --xla_gpu_cuda_data_dir names, then (ptxas) PATH, then the CUDA roots:
    pip's nvidia/cuda_nvcc (tensorflow[and-cuda] installs it) and
    /usr/local/cuda. Only a GPU needs them; nothing is run or created."""
    data_dir = None
    for token in shlex.split(environ.get("XLA_FLAGS", "")):
        name, _, value = token.partition("=")
        if name == CUDA_DATA_DIR_FLAG:
            data_dir = value  # the last one wins, as in XLA
    roots = _cuda_roots() if cuda_roots is None else cuda_roots
    preferred = [Path(data_dir)] if data_dir else []

    ptxas = next((str(p) for p in (r / "bin" / "ptxas" for r in preferred) if _runnable(p)), None)
    ptxas = ptxas or shutil.which("ptxas", path=environ.get("PATH", os.defpath))
    ptxas = ptxas or next(
        (str(p) for p in (r / "bin" / "ptxas" for r in roots) if _runnable(p)), None
    )
    libdevice = next(
        (str(p) for p in (r / LIBDEVICE for r in [*preferred, *roots]) if p.is_file()), None
    )
    return {"cuda_data_dir": data_dir, "ptxas": ptxas, "libdevice": libdevice}


def _cuda_roots() -> list[Path]:
    """pip's CUDA compiler package (nvidia-cuda-nvcc-cu12), then the system CUDA."""
    roots = []
    try:
        spec = find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        roots.append(Path(location) / "cuda_nvcc")
    return [*roots, Path("/usr/local/cuda")]


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _tensorflow() -> dict:
    from job.outputs import versions

    try:
        import tensorflow as tf

        found = versions()
    except Exception as err:  # a broken install is exactly what info must report
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    build = dict(tf.sysconfig.get_build_info())
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        gpus.append(
            {
                "name": device.name,
                "model": details.get("device_name"),
                "compute_capability": details.get("compute_capability"),
            }
        )
    return {
        "versions": found,
        "cuda_build": bool(build.get("is_cuda_build")),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "gpus": gpus,
    }


def _cluster(config: TrainConfig, environ) -> tuple:
    """(the resolved Cluster, or None if it cannot be resolved; its report)."""
    from job.strategy import resolve_cluster

    try:
        cluster = resolve_cluster(config, environ)
    except JobError as err:
        return None, {"error": str(err)}
    return cluster, {
        "source": cluster.source,
        "workers": max(1, cluster.num_workers),
        "task_type": cluster.task_type,
        "task_index": cluster.task_index,
        "is_chief": cluster.is_chief,
        "spec": cluster.spec,
    }


def _data(data_dir: Path | str) -> dict:
    from job import inputs, storage

    path = inputs.data_file(data_dir)
    present = storage.exists(path) if storage.is_uri(path) else path.is_file()
    if not present:
        return {"path": str(path), "status": "missing", "detail": "fetched on first use"}
    try:
        inputs.verify_data(data_dir)
    except JobError as err:
        return {"path": str(path), "status": "corrupt", "detail": str(err)}
    return {"path": str(path), "status": "ok"}


def _compile_cache(path: Path | None) -> dict | None:
    """The XLA compile cache: where, whether runs can add to it, what it holds."""
    if path is None:
        return None
    from job.compile_cache import entries

    sizes = [entry.stat().st_size for entry in entries(Path(path))]
    return {**_writable(path), "programs": len(sizes), "megabytes": sum(sizes) / 2**20}


def _writable(path: Path) -> dict:
    """Could `train` write there? Creates nothing to find out."""
    path = Path(path)
    result = {"path": str(path), "exists": path.is_dir()}
    reason = unwritable_reason(path, create=False)
    if reason:
        return {**result, "writable": False, "detail": reason}
    if (path / "metrics.json").is_file():
        result["detail"] = "holds a finished run: train needs --overwrite or another dir"
    return {**result, "writable": True}


def _detail(entry: dict) -> str:
    return f": {entry['detail']}" if entry.get("detail") else ""
