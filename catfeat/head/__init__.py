"""The head on cached features: the scikit-learn estimator, its Keras network, streamed training, scoring, comparison and the fit report."""
