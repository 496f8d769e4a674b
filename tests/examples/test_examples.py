"""The README's code blocks, run as the README says, across real processes on loopback.

Every fenced block of README.md is one of:

* a ``python`` block whose first line names an example (``# examples/NAME.py``) and whose
  other lines are that file's lines, in order (the README shows an excerpt; the test runs
  the whole file);
* a shell block whose every command is one this file runs (``SCENARIOS``) or exempts with
  a reason (``EXEMPT_COMMANDS``);
* a block this file runs as a whole (the systemd unit) or exempts (``EXEMPT_BLOCKS``).

``test_every_readme_block_is_run_here_or_exempt`` checks that, and that nothing listed here
is gone from the README, so a new or edited README block cannot silently rot: add it to a
scenario (or to an exempt list, with the reason) here.

The scenarios run each command with ``bash -c`` the way a user's terminal would, with local
stand-ins where the README means another machine or a fixed port: each "machine" is a HOME
of its own (so ``~/.starmesh`` is its own) and a working directory; the venv's ``bin`` comes
first on PATH (what activating the venv does); fixed ports and other machines' addresses
(``10.0.0.5:7400``, ``A:7400``) are replaced by free loopback ports and the addresses of the
nodes started here; a node that the README starts with its default listen address gets
``STARMESH_LISTEN=127.0.0.1:0`` and ``STARMESH_READY_FILE`` from the environment (its command
line stays as written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simulations.allreduce_procs import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLES = REPO / "examples"
VENV_BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# ------------------------------------------------------------------------ what runs here

RUN_A_MESH = (
    "python -m node",
    "python -m node --join 10.0.0.5:7400 --mesh-key-file mesh.key",
    "python -m node --listen 0.0.0.0:7400 --data-dir ~/.starmesh --join A:7400 --join B:7400",
    "python -m node status",
    "python -m node status --connect 10.0.0.5:7400 --json",
)
METRICS = (
    "python -m node --metrics-listen 127.0.0.1:9400 &",
    "curl -s http://127.0.0.1:9400/metrics | grep '^starmesh_members'",
)
INSTALL = ("starmesh --version",)
SIMULATIONS = (
    "python -m simulations allreduce --nodes 8",
    "python -m simulations bench wire",
)
SEED = "python -m node --listen 127.0.0.1:7400 --data-dir mesh-seed"
ALLREDUCE_ASYNCIO = (
    SEED,
    "python examples/allreduce_asyncio.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-1 --value 1",
    "python examples/allreduce_asyncio.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-2 --value 3",
)
TRAIN_TORCH = (
    "python examples/train_torch.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-1 --rank 0 --threads 1",
    "python examples/train_torch.py --join 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key --data-dir worker-2 --rank 1 --threads 1",
)
TASKS = (
    "python -m node submit --connect 127.0.0.1:7400 --data-dir mesh-seed --bundle examples/myjob mymod:work --inputs examples/myjob/inputs.jsonl --out results.jsonl",
    "seq 0 99 | python -m node submit --connect 127.0.0.1:7400 --data-dir mesh-seed --bundle examples/myjob mymod:work --inputs - --json",
    "python -m node tasks --connect 127.0.0.1:7400 --data-dir mesh-seed",
    "python examples/tasks_map.py --connect 127.0.0.1:7400 --mesh-key-file mesh-seed/mesh.key",
)
SCENARIOS = (RUN_A_MESH, METRICS, INSTALL, SIMULATIONS, ALLREDUCE_ASYNCIO, TRAIN_TORCH, TASKS)

#: First line of each block run as a whole here.
SYSTEMD_UNIT = "# /etc/systemd/system/starmesh.service"

_SETUP = ("scripts/setup.sh creates .venv and installs packages from the network (minutes); this "
          "suite runs in the .venv it made")
_BENCH = "a benchmark or a large simulation (30 s to minutes), over this file's budget; "
_SUBMITTERS = ("a placeholder key (ed25519:Xy...) and a mesh of several nodes: "
               "tests/submitters/test_submitters_net.py runs key, add, revoke and list across 3-4 real nodes")
EXEMPT_COMMANDS: Mapping[str, str] = {
    "bash scripts/setup.sh && .venv/bin/python -m node train --local 3 --steps 200 --reference --out train-out": (
        f"{_SETUP}; the run takes minutes: test_train_example_bundle_on_a_local_mesh runs train "
        "--local here, tests/training/test_train_cli.py trains the char GPT on 3 real nodes"),
    **{command: _BENCH + "a long training run on a mesh of several nodes; tests/training/test_train_cli.py "
       "runs train and jobs through the CLI on 3 real nodes (a small config)" for command in (
        "python -m node train --model charlm --steps 2000 --workers 3 --out run1",
        "python -m node train --workers 2-8 --mode diloco --inner-steps 50 --codec int8+zstd --steps 2000",
        "python -m node jobs", "python -m node train --resume JOB_ID --steps 2000")},
    **{command: _BENCH + "a long run on a mesh of several nodes; tests/training/test_train_data_net.py trains "
       "on a text file and on a directory of token arrays through train --local 2 (a small config)"
       for command in ("python -m node train --data mytext.txt --steps 2000 --workers 3",
                       "python -m node train --data tokens/ --job-arg vocab_size=50304 --steps 2000 --workers 3")},
    "python -m node train --bundle examples/trainjob --job sinejob:make_job --steps 200 --workers 2 --job-arg hidden=64": (
        "needs a mesh of 2 nodes: test_train_example_bundle_on_a_local_mesh runs it with --local 2"),
    "bash scripts/test.sh": "the test command itself: it runs this suite",
    "bash scripts/setup.sh && source .venv/bin/activate": (
        f"{_SETUP}; activating it puts its bin first on PATH, which the scenarios here do"),
    "python -m simulations demo": _BENCH + "its parts run in tests/node/test_node_mesh.py and tests/train",
    "python -m simulations train --nodes 3 --codec int8+zstd": (
        _BENCH + "tests/train/test_train_demo.py runs the same training with 2 nodes"),
    "python -m simulations gossip --nodes 1000 --loss 0.05 --crash 10 --seed 1 --plot gossip.png": (
        _BENCH + "tests/discovery/test_discovery_gossip_sim.py runs the simulator on small meshes"),
    "python -m simulations tasks --nodes 200 --subtasks 20000 --crash-rate 2 --join-rate 2 --seed 1": (
        _BENCH + "tests/tasks/test_tasks_sim.py runs the simulator on a small mesh"),
    "python -m simulations bench tasks --nodes 3": _BENCH + "tests/tasks/test_bench_tasks.py runs it small",
    "python -m simulations bench train --steps 200 --inner-steps 50": (
        _BENCH + "tests/training/test_bench_train.py runs it small"),
    **{command: ("needs root (cgroup CPU caps, network namespaces) and minutes to an hour; "
                 "tests/training/test_bench_elastic.py runs each part small")
       for command in (
           "python -m simulations bench elastic --part speedup --workers 1,2,4 --modes sync --cap 0.25 --shape 100mbit --model-size small --steps 500 --global-batch 8 --target 2.3",
           "python -m simulations bench elastic --part newcomer --k 2 --cap 0.25 --shape 100mbit --segment-steps 10 --global-batch 6",
           "python -m simulations bench elastic --part churn --churn-workers 6 --cap 0.25 --shape 100mbit --model-size small --global-batch 12 --period 20")},
    "python -m simulations bench blobs --shape loopback,100mbit": (
        "needs root and network namespaces (--shape), and minutes; tests/blobs/test_bench_blobs.py "
        "runs it small on loopback"),
    "python -m simulations bench join --nodes 8 --trials 20": _BENCH + "tests/node/test_node_bench.py",
    "python -m simulations bench detect --nodes 8 --trials 20": _BENCH + "tests/node/test_node_bench.py",
    "python -m simulations bench codecs": _BENCH + "the codecs' properties are tests/codecs",
    "python -m simulations bench allreduce --nodes 4 --size 25M --codec none,fp16,int8,int8+zstd,topk --shape loopback,100mbit,1gbit": (
        "needs root and network namespaces (--shape), and minutes; tests/allreduce_net runs the "
        "worker processes it starts"),
    **{command: _SUBMITTERS for command in (
        "python -m node submitters key", "python -m node submitters add ed25519:Xy... --name alice",
        "python -m node submitters revoke ed25519:Xy...", "python -m node submitters",
        "python -m node submitters --json")},
}
#: First line of each block that is not a program, and why.
EXEMPT_BLOCKS: Mapping[str, str] = {
    "protocol/     the wire: frames, messages, handshake, encryption, tensor codecs.  No I/O.":
        "the source layout: a directory listing, nothing to run",
}
SHELLS = ("bash", "sh", "shell", "console")

# ------------------------------------------------------------------------ reading the README


@dataclass(frozen=True)
class Block:
    lang: str
    lines: tuple[str, ...]
    line: int
    """1-based line of the opening fence in README.md."""


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README (```` ```lang ```` ... ```` ``` ````)."""
    lines = (README.read_text() if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        opening = re.fullmatch(r"\s*```\s*([\w+-]*)\s*", lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if re.fullmatch(r"\s*```\s*", lines[j])), len(lines))
        out.append(Block(opening.group(1), tuple(lines[i + 1:end]), i + 1))
        i = end + 1
    return out


def shell_commands(block: Block) -> list[str]:
    """A shell block's commands: blank and comment lines dropped, a trailing ``  # ...`` cut."""
    out = []
    for raw in block.lines:
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+#\s.*$", "", line))
    return out


def _first(block: Block) -> str:
    return next((line for line in block.lines if line.strip()), "")


def _python_block_problem(block: Block) -> str | None:
    """Why a python block is not an excerpt of the example it names (None: it is)."""
    ref = re.fullmatch(r"#\s*(examples/[\w./-]+\.py)\b.*", _first(block).strip())
    if ref is None:
        return "its first line must name its example: # examples/NAME.py"
    path = REPO / ref.group(1)
    if not path.is_file():
        return f"{ref.group(1)} does not exist"
    have = iter(line.strip() for line in path.read_text().splitlines())
    for line in block.lines[block.lines.index(_first(block)) + 1:]:
        want = line.strip()
        if want and not any(got == want for got in have):
            return f"line {want!r} is not in {ref.group(1)} (in this order)"
    return None


def readme_problems(blocks: Sequence[Block]) -> list[str]:
    """What the README shows that this file neither runs nor exempts, and what this file
    lists that the README no longer shows."""
    problems = []
    run = {command for scenario in SCENARIOS for command in scenario}
    seen: set[str] = set()
    for block in blocks:
        where = f"README.md:{block.line} ({block.lang or 'no language'})"
        first = _first(block)
        seen.add(first)
        if block.lang == "python":
            problem = _python_block_problem(block)
            if problem:
                problems.append(f"{where}: {problem}")
        elif block.lang in SHELLS:
            for command in shell_commands(block):
                seen.add(command)
                if command not in run and command not in EXEMPT_COMMANDS:
                    problems.append(f"{where}: {command!r} is neither run by tests/examples/test_examples.py "
                                    "(SCENARIOS) nor exempt (EXEMPT_COMMANDS, with the reason)")
        elif first not in EXEMPT_BLOCKS and first != SYSTEMD_UNIT:
            problems.append(f"{where}: a block neither run here nor exempt (EXEMPT_BLOCKS)")
    for listed in (*run, *EXEMPT_COMMANDS, *EXEMPT_BLOCKS, SYSTEMD_UNIT):
        if listed not in seen:
            problems.append(f"{listed!r} is listed in tests/examples/test_examples.py but not in README.md")
    return problems


def test_every_readme_block_is_run_here_or_exempt() -> None:
    assert readme_problems(readme_blocks()) == []


def test_every_example_is_linked_from_the_readme_and_run_here() -> None:
    text, here = README.read_text(), Path(__file__).read_text()
    for path in sorted(EXAMPLES.glob("*.py")):
        name = f"examples/{path.name}"
        assert f"({name})" in text, f"README.md does not link {name}"
        assert name in here, f"{name} is not run by tests/examples/test_examples.py"


def test_the_block_check_catches_rot() -> None:
    fence = "```"
    good = f"{fence}python\n# examples/allreduce_sync.py\nwith MeshNode(config) as mesh:\n{fence}\n"
    problems = readme_problems(readme_blocks(good))
    assert problems and not any(p.startswith("README.md:") for p in problems)  # only "not in README.md"
    bad = [
        f"{fence}python\nprint('hello')\n{fence}\n",
        f"{fence}python\n# examples/allreduce_sync.py\nwith MeshNode(other) as mesh:\n{fence}\n",
        f"{fence}bash\npython -m node --new-flag\n{fence}\n",
        f"{fence}ini\n[Unit]\n{fence}\n",
    ]
    for text in bad:
        assert readme_problems(readme_blocks(text))[0].startswith("README.md:1 ")


# ------------------------------------------------------------------------ running commands


def _env(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARMESH_")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


def standin(command: str, subs: Mapping[str, str]) -> str:
    for old, new in subs.items():
        command = command.replace(old, new)
    return command


@dataclass
class Proc:
    """A command started in the background (``bash -c``, its own process group)."""

    command: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_file: Path | None = None
    address: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 20.0) -> str:
        assert self.ready_file is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.command!r} exited {self.proc.returncode}:\n{self.text()}")
            try:
                self.address = json.loads(self.ready_file.read_text())["address"]
                return self.address
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        pytest.fail(f"{self.command!r} not ready after {timeout}s:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal the process group; the exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None


@dataclass
class Machine:
    """A stand-in for one machine: its HOME (``~/.starmesh`` is its own) and working directory."""

    home: Path
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def start(self, command: str, *, subs: Mapping[str, str] = {}, env: Mapping[str, str] = {},
              node: bool = True) -> Proc:
        """Run ``command`` in the background, as in a terminal of its own. ``node``: it is
        ``python -m node`` (gets ``STARMESH_READY_FILE``, waited for until it listens)."""
        line = standin(command, subs).removesuffix("&").strip()
        log = self.home / f"proc-{len(self.procs)}.log"
        extra = dict(env)
        ready = self.home / f"ready-{len(self.procs)}.json" if node else None
        if ready is not None:
            extra.setdefault("STARMESH_READY_FILE", str(ready))
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", line], cwd=self.home, env=_env(self.home, extra),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        p = Proc(line, proc, log, ready)
        self.procs.append(p)
        if ready is not None:
            p.wait_ready()
        return p

    def run(self, command: str, *, subs: Mapping[str, str] = {}, env: Mapping[str, str] = {},
            timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` to its end (exit 0 expected)."""
        line = standin(command, subs)
        done = subprocess.run(["bash", "-c", line], cwd=self.home, env=_env(self.home, env), text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(signal.SIGKILL, timeout=5)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[[str], Machine]]:
    made: list[Machine] = []

    def machine(name: str) -> Machine:
        made.append(Machine(tmp_path / name))
        return made[-1]

    yield machine
    for m in made:
        m.close()


def eventually(check: Callable[[], object], timeout: float = 20.0) -> None:
    """Retry ``check`` (an assertion) until it passes or ``timeout`` seconds are over."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


#: A node the README starts on its default listen address (0.0.0.0:7400): any free loopback port.
LISTEN_ANY = {"STARMESH_LISTEN": "127.0.0.1:0"}


def _states(report: dict[str, object]) -> dict[str, str]:
    members = report["members"]
    assert isinstance(members, list)
    return {m["id"]: m["state"] for m in members}


# ------------------------------------------------------------------------ the scenarios


def test_run_a_mesh_status_systemd_and_leave(machines: Callable[[str], Machine], tmp_path: Path) -> None:
    """"Run a mesh", "See the members", the systemd unit and "Ctrl-C or SIGTERM"."""
    first, second, third = machines("first"), machines("second"), machines("third")
    a = first.start(RUN_A_MESH[0], env=LISTEN_ANY)
    data = first.home / ".starmesh"
    for name in ("identity.key", "mesh.key"):  # "creates ~/.starmesh/{identity.key,mesh.key}"
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    shutil.copy(data / "mesh.key", second.home / "mesh.key")  # "copy mesh.key over first (scp)"
    b = second.start(RUN_A_MESH[1], subs={"10.0.0.5:7400": a.address}, env=LISTEN_ANY)
    (third.home / ".starmesh").mkdir()
    shutil.copy(data / "mesh.key", third.home / ".starmesh" / "mesh.key")
    third.start(RUN_A_MESH[2], subs={"0.0.0.0:7400": "127.0.0.1:0", "A:7400": a.address, "B:7400": b.address})

    # the systemd unit's service, its Environment and ExecStart as written, paths and the seed stood in
    unit = next(b for b in readme_blocks() if _first(b) == SYSTEMD_UNIT)
    settings = [line.split("=", 1) for line in unit.lines if "=" in line and not line.startswith("#")]
    env = dict(value.split("=", 1) for key, value in settings if key == "Environment")
    service = dict((key, value) for key, value in settings if key != "Environment")
    var_lib = tmp_path / "var-lib-starmesh"
    var_lib.mkdir()
    shutil.copy(data / "mesh.key", var_lib / "mesh.key")
    assert env["STARMESH_DATA_DIR"] == "/var/lib/starmesh" and service["KillSignal"] == "SIGTERM"
    env.update(STARMESH_DATA_DIR=str(var_lib), STARMESH_JOIN=standin(env["STARMESH_JOIN"], {"10.0.0.5:7400": a.address}),
               **LISTEN_ANY)
    opt = machines("opt-starmesh")
    exec_start = service["ExecStart"].replace("/opt/starmesh/.venv/bin/python", sys.executable)
    unit_node = opt.start(exec_start, env=env)

    def table_lists_four_alive() -> None:  # "python -m node status" asks 127.0.0.1:7400: the first node here
        out = first.run(RUN_A_MESH[3], env={"STARMESH_CONNECT": a.address}).stdout
        assert out.count("│ alive ") == 4, out  # one row per member

    eventually(table_lists_four_alive)
    out = first.run(RUN_A_MESH[4], subs={"10.0.0.5:7400": a.address}).stdout
    report = json.loads(out)
    assert sorted(_states(report).values()) == ["alive"] * 4
    assert all(m["tags"] == [] for m in report["members"]) and {"self", "members", "metrics"} <= set(report)

    # "Ctrl-C or SIGTERM makes a node announce that it leaves and exit 0 within 2 s; the others show it as left"
    started = time.monotonic()
    assert b.stop(signal.SIGTERM, timeout=5) == 0, b.text()
    assert time.monotonic() - started < 3.0
    assert unit_node.stop(signal.SIGTERM, timeout=float(service["TimeoutStopSec"])) == 0, unit_node.text()

    def two_left() -> None:
        states = _states(json.loads(first.run(RUN_A_MESH[4], subs={"10.0.0.5:7400": a.address}).stdout))
        assert sorted(states.values()) == ["alive", "alive", "left", "left"], states

    eventually(two_left)


def test_metrics(machines: Callable[[str], Machine]) -> None:
    host = machines("metrics")
    subs = {"127.0.0.1:9400": f"127.0.0.1:{free_port()}"}
    host.start(METRICS[0], subs=subs, env=LISTEN_ANY)
    out = host.run(METRICS[1], subs=subs).stdout
    assert re.search(r'^starmesh_members\{state="alive"\} 1\.0$', out, re.MULTILINE), out


def test_install_console_script(machines: Callable[[str], Machine]) -> None:
    """The venv's ``starmesh`` script (the activated venv's bin is first on PATH)."""
    out = machines("install").run(INSTALL[0]).stdout
    assert re.fullmatch(r"starmesh \S+\n", out), out


def test_quick_simulations(machines: Callable[[str], Machine]) -> None:
    host = machines("sims")
    for command in SIMULATIONS:
        host.run(command, timeout=60)


# ------------------------------------------------------------------------ the examples


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, str]]:
    """The examples' terminal 1: a node that starts a new mesh, on a free port for 7400."""
    host = Machine(tmp_path_factory.mktemp("seed"))
    port = f"127.0.0.1:{free_port()}"
    host.start(SEED, subs={"127.0.0.1:7400": port})
    try:
        yield host, port
    finally:
        host.close()


def _run_workers(seed: tuple[Machine, str], root: Path, commands: Sequence[str], timeout: float = 60.0) -> list[str]:
    """Start each worker command as in a terminal of its own (with a copy of the seed's
    mesh-seed/mesh.key where the command expects it); their outputs, once all exited 0."""
    host, port = seed
    cwd = Machine(root)
    (cwd.home / "mesh-seed").mkdir(exist_ok=True)
    shutil.copy(host.home / "mesh-seed" / "mesh.key", cwd.home / "mesh-seed" / "mesh.key")
    subs = {"127.0.0.1:7400": port, "examples/": f"{EXAMPLES}/"}
    try:
        workers = [cwd.start(c, subs=subs, node=False) for c in commands]
        outs = []
        for w in workers:
            rc = w.proc.wait(timeout)
            assert rc == 0, f"{w.command!r} exited {rc}:\n{w.text()}"
            outs.append(w.text())
        return outs
    finally:
        cwd.close()


def test_allreduce_asyncio_example(seed: tuple[Machine, str], tmp_path: Path) -> None:
    """The seed is a member of the mesh but not tagged: the group is the two workers."""
    outs = _run_workers(seed, tmp_path, ALLREDUCE_ASYNCIO[1:])
    for out in outs:
        assert "averaged over 2 members of job=demo: [2. 2. 2. 2.]" in out, out


def test_allreduce_sync_example(seed: tuple[Machine, str], tmp_path: Path) -> None:
    """Run like the asyncio example ("examples/allreduce_sync.py runs the same way")."""
    commands = [c.replace("examples/allreduce_asyncio.py", "examples/allreduce_sync.py") for c in ALLREDUCE_ASYNCIO[1:]]
    assert "examples/allreduce_sync.py" in README.read_text()
    outs = _run_workers(seed, tmp_path, commands)
    for out in outs:
        assert "averaged over 2 members of job=demo: [2. 2. 2. 2.]" in out, out


def test_train_torch_example(seed: tuple[Machine, str], tmp_path: Path) -> None:
    """Both workers end with the same parameters (same start, same averaged gradients)."""
    outs = _run_workers(seed, tmp_path, TRAIN_TORCH)
    digests = [re.search(r"rank \d: loss ([0-9.]+) after 20 steps, parameters ([0-9a-f]{16})", out) for out in outs]
    assert all(digests), outs
    assert len({d.group(2) for d in digests if d}) == 1, outs
    assert all(float(d.group(1)) < 1.0 for d in digests if d), outs


def test_run_work_on_the_mesh(seed: tuple[Machine, str], tmp_path: Path) -> None:
    """The README's task commands, one after the other, against the examples' seed node (the
    session's submitter key owns the mesh the seed created, as a first node's creator's does)."""
    (out,) = _run_workers(seed, tmp_path / "submit", TASKS[:1])
    rows = [json.loads(line) for line in (tmp_path / "submit" / "results.jsonl").read_text().splitlines()]
    assert rows == [{"index": i, "ok": True, "value": {"x": i, "square": i * i}} for i in range(10)], out
    (out,) = _run_workers(seed, tmp_path / "stdin", TASKS[1:2])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["value"]["square"] for r in lines[:-1]] == [i * i for i in range(100)], out
    assert lines[-1]["state"] == "done" and lines[-1]["done"] == 100, out
    (out,) = _run_workers(seed, tmp_path / "tasks", TASKS[2:3])
    assert "mymod:work" in out and "done" in out, out
    (out,) = _run_workers(seed, tmp_path / "script", TASKS[3:])
    assert f"squares: {[i * i for i in range(20)]}" in out and "done: 20/20 done, 0 failed" in out, out


@pytest.mark.integration
def test_train_example_bundle_on_a_local_mesh(tmp_path: Path) -> None:
    """examples/trainjob as its docstring says to run it, on a local mesh of 2 real nodes."""
    cmd = [sys.executable, "-m", "node", "train", "--local", "2", "--bundle", str(EXAMPLES / "trainjob"),
           "--job", "sinejob:make_job", "--steps", "200", "--workers", "2", "--job-arg", "hidden=64",
           "--json", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["state"] == "done" and summary["steps"] == 200 and len(summary["workers_seen"]) == 2, summary
    assert summary["val_loss"] < 0.2, summary  # sin(3x) from an MSE near 0.5 at the start
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 0
