"""Shared test setup: the hypothesis profile, the per-ISA fixture, the bundled models."""

from __future__ import annotations

import os
import platform
import re

import pytest
from hypothesis import HealthCheck, settings

# Nothing downloads at test time: transformers and huggingface_hub, which the
# tests use as references, read only local files. (The library itself never
# touches these process-wide settings.)
for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import prism_ext  # noqa: E402
from prism_ext import kernels  # noqa: E402

# "ci" (the default): the same examples on every run, so a failure reproduces;
# no deadline, since the machine is shared and timings vary. Example counts
# are set per test, small enough for the suite to finish in minutes on 2 cores.
# The isa fixture stays fixed across a test's examples, which is what we want,
# hence the function_scoped_fixture suppression.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# HYPOTHESIS_PROFILE=explore: fresh random examples on every run.
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ALL_ISAS = ("serial", "avx2", "avx512", "neon")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_ARM64 = platform.machine().lower() in ("aarch64", "arm64")


def isa_skip_reason(name: str) -> str:
    """Why the ISA ``name`` cannot run in this process."""
    f = kernels.cpu_features()
    machine = platform.machine()
    if name == "neon" and not _ARM64:
        return f"neon: not an ARM64 machine ({machine}); the C++ tests run it under qemu"
    if name in ("avx2", "avx512") and not _X86:
        return f"{name}: not an x86-64 machine ({machine})"
    if name == "avx2" and not (f["avx2"] and f["fma"] and f["os_avx"]):
        return f"avx2 not supported by this CPU/OS (avx2={f['avx2']}, fma={f['fma']}, os_avx={f['os_avx']})"
    if name == "avx512" and not (f["avx512f"] and f["os_avx512"]):
        return f"avx512 not supported by this CPU/OS (avx512f={f['avx512f']}, os_avx512={f['os_avx512']})"
    return f"{name}: not compiled into this build"


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs the test with every kernel forced onto one ISA."""
    name = request.param
    if name not in kernels.available_isas():
        pytest.skip(isa_skip_reason(name))
    with kernels.use_isa(name):
        yield name


@pytest.fixture
def reaper():
    """Start processes and form clusters through this: whatever the test
    does or fails to do, its finalizer ends every one of them."""
    from process_helpers import Reaper

    r = Reaper()
    yield r
    r.reap()


@pytest.fixture
def restore_threads():
    """Puts the kernel thread count back after a test that changes it."""
    before = kernels.get_num_threads()
    yield
    kernels.set_num_threads(before)


# --strict-skips (CI: scripts/check.sh, the wheel tests, the arm64 tests): a
# skipped test fails the run unless its reason is one of these, the reasons
# isa_skip_reason gives for an ISA this machine cannot run. Anything else (a
# missing test dependency, no root for the network lab, one core, a build
# without an ISA the CPU has) would turn a proof into a quiet "s".
ALLOWED_SKIPS = (
    re.compile(r"neon: not an ARM64 machine "),
    re.compile(r"(avx2|avx512): not an x86-64 machine "),
    re.compile(r"(avx2|avx512) not supported by this CPU/OS "),
)


def pytest_addoption(parser):
    parser.addoption("--strict-skips", action="store_true",
                     help="fail the run if a test is skipped for any reason but an ISA this machine cannot run")


def pytest_configure(config):
    if config.getoption("strict_skips"):
        config.pluginmanager.register(StrictSkips(), "strict-skips")


class StrictSkips:
    """Records every skip (of a test or of a whole module) and fails the
    session if one is not in ALLOWED_SKIPS, listing it in the summary."""

    def __init__(self):
        self.refused: list[tuple[str, str]] = []

    def _record(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            longrepr = report.longrepr
            reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
            if not any(p.match(reason) for p in ALLOWED_SKIPS):
                self.refused.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report):
        self._record(report)

    def pytest_collectreport(self, report):
        self._record(report)

    def pytest_sessionfinish(self, session):
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.refused:
            terminalreporter.section("skips refused by --strict-skips", sep="=", red=True)
            for node, reason in self.refused:
                terminalreporter.line(f"SKIPPED {node}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used a `prism serve` fixture shows the end of that
    server's log: what the server saw is the first thing a CI failure needs."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    from serve_helpers import Server

    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, Server) and value.log.is_file():
            report.sections.append((f"server log of {name} (last 40 lines)",
                                    "\n".join(value.log.read_text(errors="replace").splitlines()[-40:])))


def pytest_report_header(config):
    return (
        f"prism_ext {prism_ext.__version__} from {os.path.dirname(prism_ext.__file__)}; "
        f"isas {kernels.available_isas()}, active {kernels.active_isa()}, threads {kernels.get_num_threads()}"
    )


# The bundled models, loaded once per test module that asks for them.
@pytest.fixture(scope="module")
def gpt():
    return prism_ext.load("gpt2-tiny")


@pytest.fixture(scope="module")
def vit():
    return prism_ext.load("vit-tiny-digits")


@pytest.fixture(scope="module")
def llama():
    return prism_ext.load("llama-tiny")


# ------------------------------------------- `prism serve` (test_serve, test_serve_openai)

@pytest.fixture(scope="class")
def gpt_server(tmp_path_factory):
    from serve_helpers import Server

    s = Server(tmp_path_factory.mktemp("gpt"), "--model", "gpt2-tiny", "--devices", "2", "--cr", "2",
               "--max-tokens", "64", "--max-cr", "16", "--modes", "prism,single,voltage", "--max-body", "4096")
    yield s
    s.stop()


@pytest.fixture(scope="class")
def bert_dir(tmp_path_factory):
    """A tiny BERT classifier from a config, with a byte-level tokenizer.json."""
    import json

    import torch
    import transformers

    from prism_ext.inputs.tokenizer import byte_level_tokenizer_json

    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=256, max_position_embeddings=128, num_labels=3,
                                  id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "bert"
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(str(path))
    (path / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer_json()))
    return path


@pytest.fixture(scope="class")
def bert_server(bert_dir, tmp_path_factory):
    from serve_helpers import Server

    s = Server(tmp_path_factory.mktemp("bert-serve"), "--model", str(bert_dir), "--devices", "2", "--cr", "2",
               "--max-batch", "8", "--batch-wait-ms", "200", api_key=None)
    yield s
    s.stop()
