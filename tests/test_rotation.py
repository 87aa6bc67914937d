"""The rotations (conftest.py): each run one variant per architecture and group (in the end-to-end group, of
TURNS_PER_RUN architectures), successive runs all."""

from conftest import TURNS_PER_RUN, rotation, rotation_by_group

CASES = [(a, v) for a in ("attention_unet", "lkm_unet", "vit") for v in ("2d", "3d_fullres")] + \
        [("vit", "3d_lowres"), ("single", "2d")]


def test_each_run_keeps_one_variant_per_architecture_and_mixes_variants():
    for key in range(6):
        chosen = rotation(CASES, key)
        assert sorted(a for a, _ in chosen) == ["attention_unet", "lkm_unet", "single", "vit"]
        assert len({v for a, v in chosen if a != "single"}) > 1


def test_consecutive_keys_cover_the_whole_matrix():
    covered = set().union(*(rotation(CASES, key) for key in range(3)))  # 3: the most variants of one architecture
    assert covered == set(CASES)


def test_each_group_rotates_on_its_own():
    cases = [("end-to-end", a, v) for a, v in CASES] + [("fp16", a, v) for a in ("attention_unet", "vit")
                                                         for v in ("fp16-2d", "fp16-3d_fullres")]
    for key in range(6):
        chosen = rotation_by_group(cases, key)
        end_to_end = {("end-to-end", *c) for c in rotation(CASES, key, TURNS_PER_RUN["end-to-end"])}
        assert {(g, a, v) for g, a, v in chosen if g == "end-to-end"} == end_to_end
        assert sorted(a for g, a, _ in chosen if g == "fp16") == ["attention_unet", "vit"]
    # every window start of the end-to-end turns (4 architectures) with every variant offset (at most 3)
    assert set().union(*(rotation_by_group(cases, key) for key in range(4 * 3))) == set(cases)


def test_with_fewer_turns_than_architectures_successive_ones_take_them_and_successive_keys_cover_all():
    names = sorted({a for a, _ in CASES})
    for key in range(12):
        chosen = sorted(a for a, _ in rotation(CASES, key, turns=2))
        first = key % len(names)
        assert chosen == sorted([names[first], names[(first + 1) % len(names)]])
    # every window start (4 architectures) with every variant offset (at most 3 variants)
    assert set().union(*(rotation(CASES, key, turns=2) for key in range(4 * 3))) == set(CASES)


def test_the_end_to_end_group_runs_cases_of_only_its_turns_per_run():
    cases = [("end-to-end", f"family{i}", v) for i in range(TURNS_PER_RUN["end-to-end"] + 3) for v in ("2d", "cascade")]
    for key in range(10):
        assert len(rotation_by_group(cases, key)) == TURNS_PER_RUN["end-to-end"]
