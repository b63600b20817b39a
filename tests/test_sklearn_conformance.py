"""FusedHead as a first-class scikit-learn estimator: the estimator checks, random_state, weights."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from catfeat.head.estimator import EXPECTED_FAILED_CHECKS, FusedHead
from catfeat.head.scoring import tune_head

# The default head, as users get it: on the checks' few rows (20-150) it must train enough for the
# accuracy they ask (check_classifiers_train, check_class_weight_classifiers).
CHECKED = FusedHead()


@parametrize_with_checks([CHECKED], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*retracing.*")
        check(estimator)


def data(n=120, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) + 1.5 * y[:, None]
    return X.astype(np.float32), y


FAST = dict(epochs=5, early_stopping=False, batch_size=32, learning_rate=0.05)


def test_fit_leaves_the_global_random_generators_alone():
    X, y = data()
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    FusedHead(**FAST, random_state=5).fit(X, y)
    FusedHead(random_state=5, epochs=3).fit({"a": X[:, :2], "b": X[:, 2:]}, y)  # early stopping path
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_seed_is_a_deprecated_alias_of_random_state():
    X, y = data()
    with pytest.warns(FutureWarning, match="random_state"):
        a = FusedHead(**FAST, seed=7).fit(X, y).predict_proba(X)
    b = FusedHead(**FAST, random_state=7).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


def test_sample_weight_and_class_weight_have_an_effect():
    X, y = data()
    base = FusedHead(**FAST, random_state=1).fit(X, y).predict_proba(X)[:, 1].mean()
    w = np.where(y == 1, 10.0, 0.1)
    weighted = FusedHead(**FAST, random_state=1).fit(X, y, sample_weight=w).predict_proba(X)[:, 1].mean()
    balanced = FusedHead(**FAST, random_state=1, class_weight={0: 0.1, 1: 10.0}).fit(X, y)
    assert weighted > base + 0.05
    np.testing.assert_allclose(balanced.predict_proba(X)[:, 1].mean(), weighted, rtol=1e-5)
    # the internal validation split (early stopping) takes the weights too
    FusedHead(random_state=1, epochs=3, class_weight="balanced").fit(X, y, sample_weight=w)
    with pytest.raises(ValueError, match="sample_weight"):
        FusedHead(**FAST).fit(X, y, sample_weight=np.ones(3))


def test_labels_and_inputs_as_scikit_learn_takes_them(tmp_path):
    X, y = data()
    names = np.array(["cat", "dog"])[y]
    head = FusedHead(**FAST).fit(X.tolist(), names)  # a list of rows is one 2-D array
    assert head.classes_.tolist() == ["cat", "dog"] and head.backbones_ == ["features"]
    assert set(head.predict(X)) <= {"cat", "dog"}
    with pytest.warns(DataConversionWarning):
        FusedHead(**FAST).fit(X, y[:, None])
    with pytest.raises(ValueError, match="Unknown label type"):
        FusedHead(**FAST).fit(X, np.linspace(0, 1, len(y)))
    with pytest.raises(NotFittedError):
        FusedHead().predict(X)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    head = FusedHead(**FAST).fit(df, y)
    assert head.feature_names_in_.tolist() == list(df.columns) and head.n_features_in_ == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fitted without feature names" after a round trip
        np.testing.assert_array_equal(FusedHead.load(head.save(tmp_path / "h")).predict(df), head.predict(df))
    with pytest.raises(ValueError, match="missing:\n- f4"):
        head.predict(df.iloc[:, :4])
    with pytest.raises(ValueError, match="5 features"):
        FusedHead(**FAST).fit(X, y).predict(X[:, :4])


def test_image_predictions_name_their_columns_by_class(tmp_path):
    from conftest import save_image
    from catfeat.predict import predict_images

    X, y = data(d=6)
    head = FusedHead(**FAST).fit({"EfficientNetLite0": X}, np.array(["cat", "dog"])[y])
    files = [save_image(tmp_path / f"{i}.jpg", i) for i in range(2)]

    def model(arrays, training=False):  # sigmoid output: P(classes_[1]) = P(dog)
        return np.full((len(arrays[0]), 1), 0.7, np.float32)

    df = predict_images(None, files, predictor=(model, head))
    assert [c for c in df.columns if c.startswith("p_")] == ["p_cat", "p_dog"]
    np.testing.assert_allclose(df["p_dog"], 0.7, rtol=1e-6)
    assert df["label"].tolist() == ["dog", "dog"]


def test_class_weight_survives_save_and_load(tmp_path):
    X, y = data()
    head = FusedHead(**FAST, class_weight={0: 1.0, 1: 3.0}).fit(X, y)
    back = FusedHead.load(head.save(tmp_path / "h"))
    assert back.class_weight == {0: 1.0, 1: 3.0}


# -- several backbones as one 2-D X: backbone_widths ----------------------------------------------------
def blocks(n=120, seed=0):
    X, y = data(n, 7, seed)
    return {"lite0": X[:, :4], "lite1": X[:, 4:]}, y


def test_backbone_widths_give_the_model_of_the_blocks():
    from catfeat.head.estimator import stack_backbones

    B, y = blocks()
    X, widths = stack_backbones(B)
    assert widths == {"lite0": 4, "lite1": 3} and X.shape == (120, 7) and X.dtype == np.float32
    assert stack_backbones(list(B.values()))[1] == (4, 3)
    for w, reference in ((widths, B), ((4, 3), list(B.values()))):
        ref = FusedHead(**FAST, random_state=3).fit(reference, y)
        head = FusedHead(**FAST, random_state=3, backbone_widths=w).fit(X, y)
        assert head.backbones_ == ref.backbones_ and head.dims_ == [4, 3] and head.n_features_in_ == 7
        assert [(layer.name, layer.output.shape) for layer in head.model_.layers] == \
            [(layer.name, layer.output.shape) for layer in ref.model_.layers]
        np.testing.assert_array_equal(head.predict_proba(X), ref.predict_proba(reference))
        np.testing.assert_array_equal(head.predict_proba(reference), ref.predict_proba(X))
    # without widths the same matrix is one input: another model
    assert len(FusedHead(**FAST).fit(X, y).model_.inputs) == 1


def test_backbone_widths_are_checked_in_fit():
    B, y = blocks()
    X = np.concatenate(list(B.values()), axis=1)
    FusedHead(backbone_widths=(4, 2))  # __init__ only stores
    with pytest.raises(ValueError, match=r"4 \+ 2 = 6 columns, but X has 7 columns"):
        FusedHead(**FAST, backbone_widths=(4, 2)).fit(X, y)
    for bad in ((4, 0, 3), (4.0, 3), 7, (), (True, 6)):
        with pytest.raises(ValueError, match="backbone_widths"):
            FusedHead(**FAST, backbone_widths=bad).fit(X, y)
    with pytest.raises(ValueError, match=r"backbone_widths say lite1 \(4\), lite0 \(3\)"):
        FusedHead(**FAST, backbone_widths={"lite1": 4, "lite0": 3}).fit(B, y)
    with pytest.raises(ValueError, match="backbone_widths say 3, 4"):
        FusedHead(**FAST, backbone_widths=(3, 4)).fit(list(B.values()), y)
    FusedHead(**FAST, backbone_widths=(4, 3)).fit(B, y)  # blocks that agree with the widths are fine


def test_backbone_widths_through_scikit_learn_tools(tmp_path):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from catfeat.head.scoring import cross_validate
    from catfeat.head.estimator import stack_backbones

    B, y = blocks(150)
    X, widths = stack_backbones(B)
    head = FusedHead(**FAST, random_state=4, backbone_widths=widths)
    assert clone(head).get_params()["backbone_widths"] == widths
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    scores = cross_val_score(head, X, y, cv=folds, scoring="neg_log_loss")
    # the same folds through catfeat's CV on the dict of blocks: the same fused heads, the same scores
    ours = cross_validate(FusedHead(**FAST, random_state=4), B, y, cv=3, seed=0, clip=0)
    np.testing.assert_allclose(-scores, ours.fold_log_loss, rtol=1e-6)
    search = GridSearchCV(head, {"dropout": [0.0, 0.5]}, cv=folds, scoring="neg_log_loss").fit(X, y)
    assert search.best_estimator_.backbones_ == ["lite0", "lite1"] and len(search.best_estimator_.model_.inputs) == 2
    pipe = make_pipeline(StandardScaler(), clone(head)).fit(X, y)
    assert pipe[-1].dims_ == [4, 3] and pipe.score(X, y) > 0.8
    back = FusedHead.load(search.best_estimator_.save(tmp_path / "h"))
    assert back.get_params() == search.best_estimator_.get_params()
    np.testing.assert_array_equal(back.predict_proba(X), search.best_estimator_.predict_proba(X))
    tup = FusedHead(**FAST, backbone_widths=(4, 3)).fit(X, y)
    assert FusedHead.load(tup.save(tmp_path / "t")).backbone_widths == (4, 3)
    tuned, tuning = tune_head(FusedHead(**FAST, backbone_widths=widths), X, y, {"dropout": [0.0, 0.5]}, cv=2)
    assert tuned.backbones_ == ["lite0", "lite1"] and len(tuning.table) == 2
