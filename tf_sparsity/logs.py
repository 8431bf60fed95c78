"""Putting scalars where Keras users look: the `logs` dict (so `History` keeps
them) and, optionally, TensorBoard. Shared by every monitoring callback."""

__all__ = ["publish"]


def publish(values, logs, writer, step):
    """Put scalar `values` into the Keras `logs` (History keeps them) and TensorBoard."""
    if logs is not None:
        logs.update(values)
    if writer is not None:
        import tensorflow as tf  # TensorBoard writing is TensorFlow-specific

        with writer.as_default():
            for key, value in values.items():
                tf.summary.scalar(key, value, step=step)
        writer.flush()
