"""The end-to-end rotation (conftest.py): each run one variant per architecture, successive runs all."""

from conftest import rotation

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
