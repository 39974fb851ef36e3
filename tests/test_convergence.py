"""bench/convergence.py's plumbing (the matrix itself is a benchmark, run by hand)."""

from aunn_fast.bench.convergence import _int_list, bar_of, bar_text, run_order, table


def test_run_order_covers_every_pair_and_spreads_the_first_runs():
    settings = [(2, "native"), (2, "avx2"), (1, "native"), (1, "avx2")]
    order = run_order([0, 1, 2, 3, 4], settings)
    assert sorted(order) == sorted((s, setting) for s in range(5) for setting in settings)
    first = order[:5]
    assert [seed for seed, _ in first] == [0, 1, 2, 3, 4] and {setting for _, setting in first} == set(settings)


def test_seed_lists_and_the_table():
    assert _int_list("0-4") == [0, 1, 2, 3, 4] and _int_list("1,3-4") == [1, 3, 4]
    rows = [
        {
            "seed": 0,
            "threads": 1,
            "isa": "avx2",
            "capability": "AVX2",
            "backend": "cpp",
            "time_s": 61.25,
            "train_s": 50.0,
            "train_accuracy": 1.0,
            "near": 0.96,
            "10M": 0.9,
            "conditioning": 0.5,
            "meets_bar": True,
        },
        {"seed": 1, "threads": 2, "isa": "native", "time_s": 3.0, "error": "exit 2: boom", "meets_bar": False},
    ]
    lines = table(rows).splitlines()
    assert lines[2] == "| 0 | 1 | avx2 | AVX2 | cpp | 61.2 | 50.0 | 1.0000 | 0.9600 | 0.9000 | 0.5000 | - | - | yes |"
    assert lines[3].startswith("| 1 | 2 | native | - | - | 3.0 |") and lines[3].endswith("| NO |")
    assert "error: exit 2: boom" in lines[4]


def test_each_preset_has_its_bar():
    """The digits are judged by memorisation alone (they have no chunks to extrapolate); the toy presets also by
    valid chunks near the data and far past it."""
    assert bar_of("digits") == {"train_accuracy": 1.0}
    for preset in ("cpu", "tiny", "seed"):
        assert bar_of(preset) == {"train_accuracy": 1.0, "near": 0.9, "10M": 0.85}
    assert bar_text("digits") == "100% training accuracy"
    assert bar_text("cpu") == "100% training accuracy, valid chunks near the data >= 0.9 and 10M past it >= 0.85"
