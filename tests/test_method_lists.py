"""Every list of methods is made from the rules' registry (rules.NAMED_METHODS): the benchmarks'
defaults and the app's help name every registered method, and a method registered later reaches
each of them without another edit."""
import json
import subprocess
import sys

from balora_diffusion.app.methods import PARTS, method_help
from balora_diffusion.bench import concept, loop, methods
from balora_diffusion.rules import METHODS, NAMED_METHODS, parse_method


def test_the_registry_names_methods_that_parse_and_the_combinations_they_span():
    for name, components in NAMED_METHODS.items():
        spec = parse_method(name)
        assert spec == parse_method("+".join(components) or "lora")
        assert spec.name in METHODS
    assert [m for m in NAMED_METHODS if parse_method(m).uses_lambda] == ["ilora", "pilora"]


def test_every_list_names_every_registered_method_in_the_registry_order():
    named = list(NAMED_METHODS)
    assert loop.DEFAULT_METHODS == named
    assert [m for m in concept.FULL.methods if m in NAMED_METHODS] == named
    assert [label for label in methods.METHOD_SPECS if label in NAMED_METHODS] == named
    assert all(methods.describe(m) == {"method": m} for m in named)
    # the app's help is prose per method: a registered method without it is a gap this test names
    assert set(PARTS) == set(NAMED_METHODS)
    for name in named:
        assert method_help(name).startswith(f"**{name}**: {PARTS[name][0]}")


def test_the_lambda_family_of_the_concept_benchmark_is_the_methods_that_read_lambda(tmp_path):
    configs = concept.sweep_configs(concept.FULL, tmp_path)
    family = [c for c in configs if any(s.startswith(concept.LAMBDA_KEY) for s in c.set)]
    assert [m for c in family for m in c.methods] == ["ilora", "pilora"]
    assert "ilora" not in [m for c in configs if c not in family for m in c.methods]


def test_a_method_registered_later_reaches_every_benchmark_list():
    """In a fresh interpreter, a new name in the registry before the benchmarks are imported."""
    code = (
        "import json\n"
        "from balora_diffusion.rules import registry\n"
        "registry.NAMED_METHODS['zlora'] = ('ilora',)\n"
        "from balora_diffusion.bench import concept, loop, methods\n"
        "print(json.dumps({'loop': loop.DEFAULT_METHODS, 'concept': list(concept.FULL.methods),\n"
        "                  'lambda': [m for m in concept.FULL.methods if concept.uses_lambda(m)],\n"
        "                  'synthetic': list(methods.METHOD_SPECS)}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lists = json.loads(result.stdout)
    for name in ("loop", "concept", "synthetic", "lambda"):
        assert lists[name][-1] == "zlora", (name, lists[name])
