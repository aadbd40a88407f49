"""FGSM, in one place: the attack evaluate measures robustness with, and adversarial training.

FGSM (Goodfellow et al. 2015): x_adv = clip(x + eps * sign(d loss(x, y) / d x), 0, 1), with eps on
the [0, 1] pixel scale and the loss the cross-entropy of the model's logits (see
``logits_function``: the softmax's gradient vanishes where the model is sure, which would mask
the attack).

Adversarial training (``params.yaml`` section ``adversarial``) replaces a share of every training
batch, after augmentation, by FGSM copies of those images, made against the weights of that step
in inference mode. The other images stay clean; the loss and metrics are the usual ones over the
mixed batch, so an epoch still sees every training image once.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def logits_function(model, feature_layer: str | None = None):
    """A function of a (B, 28, 28, 1) batch on the model's weights that returns [logits], or
    [feature map of ``feature_layer``, logits], in inference mode.

    It calls the Sequential's layers one by one rather than building a sub-model from
    ``layer.output``: in a model loaded from a .keras file a layer has several graph nodes and
    ``layer.output`` may belong to one the model's output does not depend on (no gradient).
    The project's model ends in Dense(softmax); the gradient of its probabilities vanishes where
    the model is sure (p = 1.0 in float32), which would blank Grad-CAM and mask FGSM. So that
    head is applied without its softmax. Any other last layer is taken as returning scores.
    """
    if not isinstance(model, keras.Sequential):
        raise TypeError(
            f"expected a keras.Sequential (pipelines.model.build_model), got {type(model).__name__}"
        )
    names = [layer.name for layer in model.layers]
    if feature_layer is not None and feature_layer not in names:
        raise ValueError(f"model {model.name!r} has no layer {feature_layer!r}; it has {names}")
    *body, head = model.layers
    softmax_head = (
        isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax
    )

    def run(x):
        features = None
        for layer in body:
            x = layer(x, training=False)
            if layer.name == feature_layer:
                features = x
        if softmax_head:
            logits = keras.ops.matmul(x, head.kernel) + head.bias
        else:
            logits = head(x, training=False)
            if head.name == feature_layer:
                features = logits
        return [logits] if feature_layer is None else [features, logits]

    return run


def signed_gradient(run, batch, labels):
    """sign(d cross-entropy / d input) of one (B, 28, 28, 1) batch: -1, 0 or +1 per pixel.
    ``run`` is a ``logits_function``; ``labels`` are (B,) integer digits."""
    with tf.GradientTape() as tape:
        tape.watch(batch)
        (logits,) = run(batch)
        loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        )
    return tf.sign(tape.gradient(loss, batch))


def fgsm_batch(run, batch, labels, eps: float):
    """FGSM copies of one batch in [0, 1]; no gradient flows back through them."""
    adversarial = tf.clip_by_value(batch + eps * signed_gradient(run, batch, labels), 0.0, 1.0)
    return tf.stop_gradient(adversarial)


class AdversarialTraining(keras.Model):
    """The graph ``fit`` trains when ``adversarial.enabled``: [augmentation,] then ``model``, with
    the first ``ratio`` of each batch replaced by its FGSM copies at ``epsilon``.

    Shares its weights with ``model``, which alone is saved (as with the plain training graph).
    Validation and prediction go through ``call``: clean images, augmentation inactive.
    """

    def __init__(self, model: keras.Sequential, augmenter, epsilon: float, ratio: float):
        super().__init__(name="adversarial_train_graph")
        if not 0 < epsilon <= 1 or not 0 < ratio <= 1:
            raise ValueError(f"need 0 < epsilon <= 1 and 0 < ratio <= 1, got {epsilon}, {ratio}")
        self.net, self.augmenter = model, augmenter
        self.epsilon, self.ratio = float(epsilon), float(ratio)
        self._logits = logits_function(model)

    def build(self, input_shape) -> None:
        if self.augmenter is not None and not self.augmenter.built:
            self.augmenter.build(input_shape)
        self.built = True

    def call(self, x, training: bool = False):
        if self.augmenter is not None:
            x = self.augmenter(x, training=training)
        return self.net(x, training=training)

    def train_step(self, data):
        x, y = data
        if self.augmenter is not None:
            x = self.augmenter(x, training=True)
        size = tf.cast(tf.shape(x)[0], tf.float32)
        n = tf.cast(tf.round(size * self.ratio), tf.int32)
        x = tf.concat([fgsm_batch(self._logits, x[:n], y[:n], self.epsilon), x[n:]], axis=0)
        with tf.GradientTape() as tape:
            y_pred = self.net(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        self.optimizer.apply(
            tape.gradient(loss, self.trainable_variables), self.trainable_variables
        )
        for metric in self.metrics:  # as Keras' guide to a custom train_step does it
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {metric.name: metric.result() for metric in self.metrics}
