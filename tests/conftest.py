import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one thread is as fast, and two OpenMP threads on a busy 2-core machine can be 100x
    slower. Tests that need more set it themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- skips: reported always (-rs in pyproject's addopts); under PEFTC_SKIPS=fail (CI) any skip fails the run -------
# Everything the suite needs (peft, the real MiniLM, torch.distributed) is installed in CI, so a skip there means a
# parity case silently did not run: that must not pass as a success.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PEFTC_SKIPS") == "fail" and _SKIPPED and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SKIPPED:
        verdict = "these fail the run (PEFTC_SKIPS=fail)" if os.environ.get("PEFTC_SKIPS") == "fail" else \
            "set PEFTC_SKIPS=fail to make them fail the run"
        terminalreporter.write_line(f"{len(_SKIPPED)} test(s) skipped; {verdict}:", red=True)
        for line in _SKIPPED:
            terminalreporter.write_line(f"  {line}")
