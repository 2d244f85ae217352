import pytest

from pipeline.data.layout import DatasetError, check_image_folder
from pipeline.data.synthetic import write_synthetic_imagenet


@pytest.fixture
def tree(tmp_path):
    return write_synthetic_imagenet(tmp_path / "data", num_classes=3, train_per_class=2, val_per_class=1,
                                    min_side=16, max_side=24)


def test_a_good_tree_gives_its_sorted_classes(tree):
    assert check_image_folder(tree, 3) == sorted(p.name for p in (tree / "train").iterdir())


def test_missing_root_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError) as err:
        check_image_folder(tmp_path / "nowhere", 3)
    assert str(tmp_path / "nowhere") in str(err.value) and "data.root" in str(err.value)
    assert "data.generate.enabled=true" in str(err.value)


def test_missing_val_split_is_named(tree):
    for f in (tree / "val").rglob("*.JPEG"):
        f.unlink()
    for d in sorted((tree / "val").iterdir()):
        d.rmdir()
    (tree / "val").rmdir()
    with pytest.raises(DatasetError, match="no 'val/' folder"):
        check_image_folder(tree, 3)


def test_empty_class_folder_is_named(tree):
    empty = sorted((tree / "train").iterdir())[1]
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DatasetError) as err:
        check_image_folder(tree, 3)
    assert str(empty) in str(err.value) and "holds no images" in str(err.value)


def test_num_classes_that_disagrees_with_the_folders_names_both(tree):
    with pytest.raises(DatasetError) as err:
        check_image_folder(tree, 1000)
    assert "model.num_classes=1000" in str(err.value) and "model.num_classes=3" in str(err.value)
    assert str(tree / "train") in str(err.value)


def test_train_and_val_with_different_classes_are_rejected(tree):
    (tree / "val" / "n99999999").mkdir()
    (tree / "val" / "n99999999" / "x.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match="n99999999"):
        check_image_folder(tree, 3)
