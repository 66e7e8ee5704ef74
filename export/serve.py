"""Start Triton Inference Server from the `nvidia-pytriton` wheel on a model repository.

The wheel ships a real `tritonserver` (2.51) with the Python backend, which runs on a CPU machine:

    pytriton/tritonserver/bin/tritonserver                      the server
    pytriton/tritonserver/backends/python/                      libtriton_python.so, triton_python_backend_utils.py
    pytriton/tritonserver/python_backend_stubs/3.X/             triton_python_backend_stub per Python version
    nvidia_pytriton.libs/                                       the libraries they link (LD_LIBRARY_PATH)

`TritonServer` assembles a backend directory (python/ with the library, the utils and the stub for the
running Python), starts the server listening on 127.0.0.1 by default, waits until it reports ready and
stops it on exit (SIGTERM, then SIGKILL after a timeout).

Two facts about the wheel's stub (checked with nvidia-pytriton 0.7.0 / Triton 2.51) shape this module:
- Its embedded Python ignores PYTHON* variables (sys.flags.ignore_environment = 1) and starts from the
  prefix of the libpython it loads. The running interpreter's libpython goes first on LD_LIBRARY_PATH, and
  the assembled `triton_python_backend_utils.py` starts with a preamble that puts this environment's
  site-packages (ANYID_RT_SITE_PACKAGES, through site.addsitedir so that editable installs work) at the
  front of sys.path, before the module imports numpy.
- It is built with a pybind11 that predates numpy 2: with numpy 2.x every tensor it hands to Python holds
  its first element repeated (measured: [1.5, 2, 3] arrives as [1.5, 1.5, 1.5]). nvidia-pytriton pins
  numpy<2 for that reason. Where this environment has numpy 2, the server gets a numpy<2 of its own in a
  stub folder (default: the environment's share/ folder) and the rest of the environment keeps numpy 2.
  Preparing that folder is an explicit one-time step, `anyid-rt serve --prepare` (`prepare_stub_site`,
  which runs pip); serving never installs anything and fails naming that command when the folder is not
  prepared (`require_stub_site`). The stub imports numpy from C++ before any Python code runs, with ''
  (the working directory) first on its sys.path: the server is started in that folder, so that import
  finds the numpy<2 (the preamble keeps it first for later imports too).

    with TritonServer("repo") as server:        # free ports when none are given
        print(server.http_url, server.grpc_url)
"""
from __future__ import annotations

import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .qdq import MissingDependency

PYTRITON_INSTALL = ("the Triton server comes from the nvidia-pytriton wheel: pip install --no-deps nvidia-pytriton "
                    "(--no-deps: only its server files are used, and its numpy<2 pin would downgrade numpy)")


class ServerError(RuntimeError):
    """tritonserver did not start or stopped; the message holds the end of its log."""


def wheel_paths() -> dict[str, Path]:
    """Paths of the server, the Python backend, this Python's stub and the bundled libraries."""
    import importlib.util

    # located, not imported: pytriton's own Python API (and its numpy<2 pin) is not needed, only its files
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(PYTRITON_INSTALL)
    package = Path(list(spec.submodule_search_locations)[0])
    root = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {"server": root / "bin" / "tritonserver", "python_backend": root / "backends" / "python",
             "stub": root / "python_backend_stubs" / version / "triton_python_backend_stub", "libs": libs,
             "caches": root / "caches"}
    if not paths["stub"].is_file():
        stubs = root / "python_backend_stubs"
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} (it has {have}); "
                          "run with one of those Python versions")
    for key in ("server", "python_backend"):
        if not paths[key].exists():
            raise ServerError(f"{paths[key]} is missing from the nvidia-pytriton install; reinstall it")
    return paths


_UTILS_PREAMBLE = """\
# --- added by anyid_rt.export.serve: the stub's Python ignores PYTHONPATH, so the serving environment's
# paths are put first here, before this module imports numpy (ANYID_RT_STUB_PATH: a numpy<2 for this stub;
# ANYID_RT_SITE_PACKAGES: the environment's site-packages, processed by site.addsitedir).
import os as _os, site as _site, sys as _sys
_front = [_d for _d in _os.environ.get("ANYID_RT_STUB_PATH", "").split(_os.pathsep) if _d]
_before = list(_sys.path)
for _d in _os.environ.get("ANYID_RT_SITE_PACKAGES", "").split(_os.pathsep):
    if _d:
        _site.addsitedir(_d)
_front += [_p for _p in _sys.path if _p not in _before]
_sys.path[:] = _front + [_p for _p in _before if _p not in _front]
del _os, _site, _sys, _front, _before
# --- end of the anyid_rt preamble
"""


def assemble_backends(dest: str | Path) -> Path:
    """`dest/python/` with libtriton_python.so, triton_python_backend_utils.py (with the sys.path preamble)
    and the stub for this Python; returns dest."""
    paths = wheel_paths()
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    shutil.copy2(paths["python_backend"] / "libtriton_python.so", py / "libtriton_python.so")
    utils = (paths["python_backend"] / "triton_python_backend_utils.py").read_text()
    (py / "triton_python_backend_utils.py").write_text(_UTILS_PREAMBLE + utils)
    shutil.copy2(paths["stub"], py / "triton_python_backend_stub")
    os.chmod(py / "triton_python_backend_stub", 0o755)
    return Path(dest)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stub_site_dir() -> Path:
    """The default stub folder for the numpy<2: inside this environment (removed with it)."""
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.prefix) / "share" / "anyid_rt" / f"triton-stub-py{v}"


def _numpy_major(path: Path | None = None) -> int | None:
    """Major version of the numpy found in `path` (a --target folder) or importable here; None if none."""
    from importlib.metadata import PathDistribution, PackageNotFoundError, version

    if path is None:
        try:
            return int(version("numpy").split(".")[0])
        except PackageNotFoundError:
            return None
    for info in path.glob("numpy-*.dist-info"):
        return int(PathDistribution(info).version.split(".")[0])
    return None


def prepare_command(stub_dir: str | Path | None = None) -> str:
    """The one-time command that prepares `stub_dir` (the default folder when None)."""
    target = Path(stub_dir).resolve() if stub_dir is not None else stub_site_dir().resolve()
    return "anyid-rt serve --prepare" + ("" if target == stub_site_dir().resolve() else f" --stub-dir {target}")


def require_stub_site(stub_dir: str | Path | None = None) -> Path | None:
    """The prepared stub folder holding a numpy<2, or None when this environment's numpy is already 1.x
    (the stub then uses it). Raises ServerError, in one line naming the command to run, when the folder
    has not been prepared; installs nothing."""
    if (_numpy_major() or 1) < 2:
        return None
    target = (Path(stub_dir) if stub_dir is not None else stub_site_dir()).resolve()  # the server's cwd
    if _numpy_major(target) != 1:
        raise ServerError(f"the Triton Python backend stub needs a numpy<2 of its own (this environment has numpy "
                          f"2) and {target} holds none; prepare it once with: {prepare_command(stub_dir)}")
    return target


def prepare_stub_site(stub_dir: str | Path | None = None, quiet: bool = False) -> Path | None:
    """The one-time preparation behind `anyid-rt serve --prepare`: installs a numpy<2 for the stub with pip
    into `stub_dir` (default `stub_site_dir()`) unless one is there already. Returns the folder, or None when
    this environment's numpy is 1.x (nothing to prepare). Raises ServerError when pip fails."""
    if (_numpy_major() or 1) < 2:
        return None
    target = (Path(stub_dir) if stub_dir is not None else stub_site_dir()).resolve()
    if _numpy_major(target) == 1:
        return target
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target),
           "numpy<2"]
    if not quiet:
        print(f"installing numpy<2 for the Triton Python backend stub into {target} ...", flush=True)
    # a stale numpy (2.x, or a half install) goes; nothing else: the folder may be one the user named
    for stale in [target / "numpy", target / "numpy.libs", *target.glob("numpy-*.dist-info")]:
        shutil.rmtree(stale, ignore_errors=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or _numpy_major(target) != 1:
        raise ServerError(f"could not install numpy<2 for the Triton stub ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return target


def server_env(base: dict[str, str] | None = None, stub_site: Path | None = None) -> dict[str, str]:
    """The server's environment: the wheel's libraries and this interpreter's libpython on
    LD_LIBRARY_PATH, this environment's site-packages and the stub's numpy<2 for the Python models."""
    env = dict(os.environ if base is None else base)
    lib_dirs = []
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        lib_dirs.append(libdir)  # the stub then embeds the same Python build as this one
    lib_dirs.append(str(wheel_paths()["libs"]))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    dirs = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    env["ANYID_RT_SITE_PACKAGES"] = os.pathsep.join(d for d in dirs if Path(d).is_dir())
    env["ANYID_RT_STUB_PATH"] = str(stub_site) if stub_site else ""
    return env


class TritonServer:
    """A tritonserver process on a model repository; a context manager (start on enter, stop on exit)."""

    def __init__(self, model_repository: str | Path, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file: str | Path | None = None,
                 startup_timeout: float = 300.0, stop_timeout: float = 30.0, log_verbose: int = 0,
                 extra_args: Sequence[str] = (), stub_dir: str | Path | None = None):
        self.repo = Path(model_repository).resolve()
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository not found: {self.repo} (write one with "
                                    "`anyid-rt export triton-repo`)")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.log_verbose, self.extra_args = log_verbose, list(extra_args)
        self._own_log = log_file is None
        self.log_path = Path(log_file).resolve() if log_file else None
        self.stub_dir = stub_dir  # the numpy<2 folder of `anyid-rt serve --prepare`; None: the default one
        self.process: subprocess.Popen | None = None
        self._tmp: str | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backend_dir: Path) -> list[str]:
        return [str(wheel_paths()["server"]), "--model-repository", str(self.repo),
                "--backend-directory", str(backend_dir),
                "--http-address", self.host, "--http-port", str(self.http_port),
                "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
                "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
                "--exit-timeout-secs", str(int(self.stop_timeout)), "--log-verbose", str(self.log_verbose),
                "--disable-auto-complete-config",
                # the stub starts in seconds, but model initialisation (loading 5B weights) can take minutes
                "--backend-config", "python,stub-timeout-seconds=300", *self.extra_args]

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("server already started")
        stub_site = require_stub_site(self.stub_dir)  # before anything starts: fails naming the command
        self._tmp = tempfile.mkdtemp(prefix="anyid-tritonserver-")
        backends = assemble_backends(Path(self._tmp) / "backends")
        if self.log_path is None:
            self.log_path = Path(self._tmp) / "tritonserver.log"
        self._log = open(self.log_path, "ab")
        # own process group: Ctrl-C in a terminal reaches us, and we stop the server (and its stubs) ourselves
        # cwd: the stub imports numpy before any Python code runs (from its C++ side), and the first entry
        # of its sys.path is '' (the working directory): starting there makes that numpy the stub's numpy<2
        self.process = subprocess.Popen(self.command(backends), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=server_env(stub_site=stub_site), start_new_session=True,
                                        cwd=str(stub_site or self._tmp))
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, AttributeError):
            return "(no log)"
        return "\n".join(text[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (Triton finishes in-flight requests, up to the exit timeout), then SIGKILL to the whole
        process group (the Python stubs) if it is still running. Returns the exit code."""
        proc, code = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_timeout + 10)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait(timeout=10)
            code = proc.returncode
            _kill_group(proc.pid)  # stubs left behind by a server that died
            self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            if self._own_log and self.log_path is not None and self.log_path.is_relative_to(self._tmp):
                self.log_path = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the server was started in its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def serve(model_repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, log_file: str | None = None, startup_timeout: float = 600.0,
          log_verbose: int = 0, extra_args: Sequence[str] = (), stub_dir: str | Path | None = None) -> int:
    """Run the server in the foreground until Ctrl-C / SIGTERM, then stop it cleanly. Returns an exit code.
    Raises ServerError naming `anyid-rt serve --prepare` before anything starts when the stub folder is not
    prepared."""
    require_stub_site(stub_dir)
    server = TritonServer(model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, log_file=log_file, startup_timeout=startup_timeout,
                          log_verbose=log_verbose, extra_args=extra_args, stub_dir=stub_dir)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.start()
        print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
              f"{host}:{server.metrics_port}; log {server.log_path}. Ctrl-C stops it.", flush=True)
        while server.process.poll() is None:
            time.sleep(0.5)
        print(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr)
        return server.process.returncode or 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


__all__ = ["TritonServer", "ServerError", "serve", "assemble_backends", "wheel_paths", "server_env", "free_port",
           "prepare_stub_site", "require_stub_site", "prepare_command", "stub_site_dir"]
