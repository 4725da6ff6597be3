"""The README's self-contained Python example runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_model_example_runs():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  example = [b for b in blocks if "build_model" in b][0]
  example = example.replace('input_size=32, mediator_num=16', 'input_size=32, mediator_num=16, depth=1')
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)  # noqa: S102
  assert scope["out"].shape == (2, 32, 32, 4)
  assert scope["guided"].shape == (4, 32, 32, 4)
