"""The short fine-tunes of the structured pruners: a few optimizer steps, traced once.

Greedy selection fine-tunes after every group (`greedy_loss`,
`objective="loss"`) and the group-wise baselines after the cut (`_imitate`).
`model.compile` + `model.fit` for a handful of steps spends most of its time
setting up (data adapter, callbacks, the train function): 4.7 s against 1.9 s
for this loop on the MNIST-1D MobileNet, paid once per pruned group.
"""


def train_steps(model, batches, loss, optimizer):
    """One `optimizer` step per `(x, y)` of `batches` on `loss(y, model(x)) + sum(model.losses)`.

    What `model.compile(optimizer, loss)` and `model.fit` over the same
    batches do (training-mode forward pass, so BatchNormalization statistics
    move; regularization losses included), without compiling `model`.

    Args:
        model: a built Keras model.
        batches: an iterable of `(x, y)` NumPy or tensor pairs.
        loss: a Keras loss (callable `loss(y_true, y_pred)`).
        optimizer: a Keras optimizer; built here on the trainable variables.

    Example:

    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> before = m.get_weights()[0].copy()
    >>> x, y = np.ones((4, 3), "float32"), np.zeros((4, 1), "float32")
    >>> train_steps(m, [(x, y)] * 2, keras.losses.MeanSquaredError(), keras.optimizers.SGD(0.1))
    >>> bool((m.get_weights()[0] != before).all())
    True
    """
    import tensorflow as tf  # the traced step (GradientTape)

    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
            if model.losses:
                value = value + tf.add_n(model.losses)
        optimizer.apply(tape.gradient(value, variables), variables)

    for x, y in batches:
        step(x, y)
