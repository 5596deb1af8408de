"""The README's set-up commands are what CI runs, and its loss example runs."""
import re
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    (block,) = _blocks(section, "bash")
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert "torch==2.14.1" in cmds[0] and "torchvision==0.29.1" in cmds[0]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    for c in cmds:
        assert c in ci, f"README command not run verbatim by .ci/run: {c}"


def test_readme_loss_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in _blocks(readme, "python") if "GuardLoss" in b)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ns = {"model": model, "loader": [(x, y)], "opt": opt, "x": x, "y": y}
    before = [p.detach().clone() for p in model.parameters()]
    exec(compile(textwrap.dedent(example), "README.md", "exec"), ns)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert ns["out"].penalty >= 0 and torch.isfinite(ns["out"].loss)


# shrinking flags per stage: the README's commands run as written plus these (CPU seconds)
_SMALL = {
    "squeeze": ["--regularizer", "none", "--max-train", "128", "--max-val", "32", "--epochs", "1",
                "--no-progress"],
    "recover": ["--ipc", "1", "--iterations", "2", "--no-progress"],
    "relabel": ["--epochs", "1", "--batch-size", "5"],
    "evaluate": ["--student-epochs", "1", "--n-examples", "4", "--attacks", "PGD100",
                 "--protocol", "paper-code"],
}


def test_readme_stage_commands_run(tmp_path, monkeypatch):
    """The README's stage-by-stage block, executed in order in a scratch folder: each line's
    arguments go to the CLI's entry point (what `python -m guard_fast.train` calls), in this
    process, so the four stages share one start-up."""
    import shlex

    from guard_fast.train import main

    readme = (ROOT / "README.md").read_text()
    block = readme.split("### The stages one by one", 1)[1].split("```", 2)[1]
    cmds = [ln.split("#", 1)[0].strip() for ln in block.splitlines()
            if ln.strip().startswith("python -m guard_fast.train")]
    assert [c.split()[3] for c in cmds] == ["squeeze", "recover", "relabel", "evaluate"], cmds
    monkeypatch.chdir(tmp_path)
    for c in cmds:
        words = shlex.split(c)
        assert words[:3] == ["python", "-m", "guard_fast.train"], c
        args = words[3:]
        assert main([*args, *_SMALL[args[0]]]) == 0, c
    assert (tmp_path / "runs" / "student" / "student.pt").exists()
    assert (tmp_path / "runs" / "student" / "eval" / "results.json").exists()
