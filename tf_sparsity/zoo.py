"""Reference architectures used by the demo, benchmarks and tests."""

import keras


def _l2(weight_decay):
    # Keras' L2(l) adds l * sum(w^2); coupled weight decay wd is L2(wd / 2).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def mnist1d_cnn(filters=32, hidden=256, num_classes=10, seq_len=40, weight_decay=0.0,
                name="mnist1d_cnn"):
    """The MNIST-1D 1-D CNN of the design notes: conv-conv/2-conv/2-dense-dense.

    `weight_decay` puts coupled L2 on the kernels (for dense baselines; STR
    wrappers carry their own).

    >>> tfs.zoo.mnist1d_cnn().count_params()  # doctest: +SKIP
    """
    layers = keras.layers
    reg = _l2(weight_decay)
    inputs = keras.Input((seq_len, 1), name="signal")
    x = layers.Conv1D(filters, 5, padding="same", activation="relu", kernel_regularizer=reg, name="conv1")(inputs)
    x = layers.Conv1D(filters, 3, strides=2, padding="same", activation="relu", kernel_regularizer=reg, name="conv2")(x)
    x = layers.Conv1D(filters, 3, strides=2, padding="same", activation="relu", kernel_regularizer=reg, name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", kernel_regularizer=reg, name="fc1")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def mnist1d_cnn_bn(filters=32, hidden=256, num_classes=10, seq_len=40, weight_decay=0.0,
                   kernel_initializer="glorot_uniform", name="mnist1d_cnn_bn"):
    """`mnist1d_cnn` with BatchNormalization after every convolution (STR's ResNets have it).

    conv-BN-ReLU x3 (no conv bias: BN's offset replaces it), dense, dense.
    `kernel_initializer="kaiming"` starts the kernels as the STR code does
    (PyTorch `kaiming_normal_`, fan-in, untruncated: He normal); any Keras
    initializer works. `weight_decay` as in `mnist1d_cnn` (kernels only).

    >>> [l.name for l in tfs.zoo.mnist1d_cnn_bn().layers if "bn" in l.name]
    ['bn1', 'bn2', 'bn3']
    """
    layers = keras.layers
    if kernel_initializer == "kaiming":
        kernel_initializer = keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")
    reg = _l2(weight_decay)
    common = dict(padding="same", use_bias=False, kernel_regularizer=reg, kernel_initializer=kernel_initializer)
    inputs = keras.Input((seq_len, 1), name="signal")
    x = inputs
    for i, (size, stride) in enumerate([(5, 1), (3, 2), (3, 2)], start=1):
        x = layers.Conv1D(filters, size, strides=stride, name=f"conv{i}", **common)(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", kernel_regularizer=reg, kernel_initializer=kernel_initializer,
                     name="fc1")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, kernel_initializer=kernel_initializer,
                           name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def mnist1d_mlp(hidden=(512, 512), num_classes=10, seq_len=40, weight_decay=0.0, name="mnist1d_mlp"):
    """A Dense-only MNIST-1D classifier (block-sparse FC experiments)."""
    reg = _l2(weight_decay)
    inputs = keras.Input((seq_len, 1), name="signal")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=reg, name=f"fc{i + 1}")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg16_bn(input_shape=(32, 32, 3), classes=100, name="vgg16_bn", kernel_initializer="paper"):
    """VGG-16 with batch norm for CIFAR-sized inputs, as in the SynFlow paper.

    13 conv3x3-BN-ReLU layers (the last block without pooling), global average
    pooling and one linear classifier: 14.7M prunable weights. Kernels start
    as in the SynFlow code ("paper": He normal, fan-in, untruncated -- PyTorch's
    `kaiming_normal_`), zero biases; pass any Keras initializer instead.

    >>> tfs.zoo.vgg16_bn().count_params()  # doctest: +SKIP
    """
    layers = keras.layers
    if kernel_initializer == "paper":
        kernel_initializer = keras.initializers.VarianceScaling(2.0, "fan_in", "untruncated_normal")
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    conv = 0
    for item in VGG16_CONFIG:
        if item == "M":
            x = layers.MaxPooling2D(2)(x)
            continue
        conv += 1
        x = layers.Conv2D(item, 3, padding="same", kernel_initializer=kernel_initializer, name=f"conv{conv}")(x)
        x = layers.BatchNormalization(name=f"bn{conv}")(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, kernel_initializer=kernel_initializer, name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def mnist1d_resnet(filters=(32, 64), blocks=2, num_classes=10, seq_len=40, weight_decay=0.0,
                   name="mnist1d_resnet", bn_momentum=0.9):
    """A 1-D ResNet for MNIST-1D: stem, basic residual blocks (conv-BN-ReLU-conv-BN + add)
    in stages of `filters` (stride 2 with a 1x1 projection between stages), GAP, logits.

    The residual adds tie channels across blocks: channel pruning needs
    `tfs.surgery.channel_groups`. BatchNormalization uses `bn_momentum=0.9`
    (PyTorch's 0.1): with Keras' 0.99 a few epochs on 8k samples leave the
    moving statistics near their initial values, and the model evaluates at
    chance in inference mode although it trains.

    >>> m = tfs.zoo.mnist1d_resnet()
    >>> len(tfs.surgery.channel_groups(m).prunable())
    6
    """
    layers = keras.layers
    reg = _l2(weight_decay)

    def conv(x, n, k, stride, label):
        x = layers.Conv1D(n, k, strides=stride, padding="same", use_bias=False, kernel_regularizer=reg,
                          name=f"{label}_conv")(x)
        return layers.BatchNormalization(momentum=bn_momentum, name=f"{label}_bn")(x)

    inputs = keras.Input((seq_len, 1), name="signal")
    x = layers.ReLU(name="stem_relu")(conv(inputs, filters[0], 5, 1, "stem"))
    for s, n in enumerate(filters):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            label = f"s{s + 1}b{b + 1}"
            shortcut = conv(x, n, 1, stride, f"{label}_proj") if stride != 1 or x.shape[-1] != n else x
            h = layers.ReLU(name=f"{label}_relu1")(conv(x, n, 3, stride, f"{label}_1"))
            h = conv(h, n, 3, 1, f"{label}_2")
            x = layers.ReLU(name=f"{label}_out")(layers.Add(name=f"{label}_add")([shortcut, h]))
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def mnist1d_mobilenet(widths=(16, 24, 32), expansion=4, num_classes=10, seq_len=40, weight_decay=0.0,
                      name="mnist1d_mobilenet", bn_momentum=0.9):
    """A 1-D MobileNetV2-style net for MNIST-1D: inverted residual blocks (1x1 expand,
    depthwise conv, squeeze-excite, 1x1 project, residual add where shapes allow).

    `bn_momentum=0.9`: the depthwise outputs' variance is ~1e-2, so with Keras'
    0.99 the moving variance stays dominated by its initial 1.0 for the first
    few hundred steps and inference-mode accuracy is at chance (what the
    issue-15 benchmark's 3-epoch run measured).

    >>> m = tfs.zoo.mnist1d_mobilenet()
    >>> sorted(l.name for l, _ in tfs.surgery.channel_groups(m).groups["b1_expand"].producers)
    ['b1_expand', 'b1_se_expand']
    """
    layers = keras.layers
    reg = _l2(weight_decay)
    inputs = keras.Input((seq_len, 1), name="signal")
    x = layers.Conv1D(widths[0], 5, padding="same", use_bias=False, kernel_regularizer=reg, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu")(layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x))
    i = 0
    for s, n in enumerate(widths):
        for b in range(2):
            i += 1
            stride = 2 if s > 0 and b == 0 else 1
            e = layers.Conv1D(x.shape[-1] * expansion, 1, use_bias=False, kernel_regularizer=reg,
                              name=f"b{i}_expand")(x)
            e = layers.ReLU(6.0, name=f"b{i}_expand_relu")(layers.BatchNormalization(momentum=bn_momentum, name=f"b{i}_expand_bn")(e))
            d = layers.DepthwiseConv1D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(e)
            d = layers.ReLU(6.0, name=f"b{i}_dw_relu")(layers.BatchNormalization(momentum=bn_momentum, name=f"b{i}_dw_bn")(d))
            se = layers.GlobalAveragePooling1D(keepdims=True, name=f"b{i}_se_pool")(d)
            se = layers.Conv1D(max(4, d.shape[-1] // 8), 1, activation="relu", name=f"b{i}_se_reduce")(se)
            se = layers.Conv1D(d.shape[-1], 1, activation="sigmoid", name=f"b{i}_se_expand")(se)
            d = layers.Multiply(name=f"b{i}_se")([d, se])
            p = layers.Conv1D(n, 1, use_bias=False, kernel_regularizer=reg, name=f"b{i}_project")(d)
            p = layers.BatchNormalization(momentum=bn_momentum, name=f"b{i}_project_bn")(p)
            x = layers.Add(name=f"b{i}_add")([x, p]) if stride == 1 and x.shape[-1] == n else p
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------
# The MLPerf Tiny reference networks (mlcommons/tiny, benchmark/training),
# rebuilt layer for layer. Their depthwise convolutions are passed
# `kernel_regularizer`/`kernel_initializer` there, which tf.keras 2 ignores
# for the depthwise kernel (it reads `depthwise_*`): they have no L2 and
# start Glorot uniform, as here. The reference `l2(1e-4)` is Keras L2(1e-4),
# i.e. `weight_decay=2e-4` in this module's coupled convention (`_l2`).


def _mlperf_pool(x, name):
    # The references pool the last feature map whole (KWS 25x5, VWW 3x3, IC 8x8).
    return keras.layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name=name)(x)


def mlperf_tiny_dscnn(num_classes=12, input_shape=(49, 10, 1), weight_decay=2e-4, name="mlperf_tiny_dscnn"):
    """MLPerf Tiny keyword spotting: the DS-CNN of `keyword_spotting/keras_model.py`.

    conv 64 (10x4, stride 2)-BN-ReLU-dropout 0.2, four depthwise-separable
    blocks (depthwise 3x3-BN-ReLU, conv 64 1x1-BN-ReLU), dropout 0.4,
    average pooling over the whole 25x5 map, softmax over `num_classes`
    (input: 49 frames x 10 MFCCs). Convolutions keep their biases; coupled L2
    `weight_decay` on the regular conv kernels (the reference's l2(1e-4) is
    2e-4 here).

    >>> tfs.zoo.mlperf_tiny_dscnn().count_params()
    24908
    """
    layers = keras.layers
    reg = _l2(weight_decay)
    inputs = keras.Input(input_shape, name="mfcc")
    x = layers.Conv2D(64, (10, 4), strides=2, padding="same", kernel_regularizer=reg, name="conv1")(inputs)
    x = layers.ReLU(name="relu1")(layers.BatchNormalization(name="bn1")(x))
    x = layers.Dropout(0.2, name="dropout1")(x)
    for i in range(1, 5):
        x = layers.DepthwiseConv2D(3, padding="same", name=f"b{i}_dw")(x)
        x = layers.ReLU(name=f"b{i}_dw_relu")(layers.BatchNormalization(name=f"b{i}_dw_bn")(x))
        x = layers.Conv2D(64, 1, padding="same", kernel_regularizer=reg, name=f"b{i}_pw")(x)
        x = layers.ReLU(name=f"b{i}_pw_relu")(layers.BatchNormalization(name=f"b{i}_pw_bn")(x))
    x = layers.Dropout(0.4, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(_mlperf_pool(x, "pool"))
    outputs = layers.Dense(num_classes, activation="softmax", name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


# MobileNetV1's depthwise-separable blocks at alpha=1: (pointwise filters, stride).
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                       (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def mlperf_tiny_mobilenet(num_classes=2, input_shape=(96, 96, 3), alpha=0.25, weight_decay=2e-4,
                          name="mlperf_tiny_mobilenet"):
    """MLPerf Tiny visual wake words: MobileNetV1 of `visual_wake_words/vww_model.py`.

    conv 32*alpha (3x3, stride 2)-BN-ReLU, 13 depthwise-separable blocks
    (depthwise 3x3-BN-ReLU, conv 1x1-BN-ReLU; `MOBILENET_V1_BLOCKS` scaled by
    `alpha`: 16 ... 256 filters at the reference's 0.25), average pooling
    over the whole last map (3x3 at 96x96), softmax. Plain ReLU (not ReLU6),
    conv biases kept; regular conv kernels He normal with coupled L2
    `weight_decay` (the reference's l2(1e-4) is 2e-4 here).

    >>> m = tfs.zoo.mlperf_tiny_mobilenet()
    >>> m.count_params(), m.get_layer("b13_pw").filters
    (221794, 256)
    """
    layers = keras.layers
    reg = _l2(weight_decay)
    common = dict(padding="same", kernel_initializer="he_normal", kernel_regularizer=reg)
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(int(32 * alpha), 3, strides=2, name="conv1", **common)(inputs)
    x = layers.ReLU(name="relu1")(layers.BatchNormalization(name="bn1")(x))
    for i, (filters, stride) in enumerate(MOBILENET_V1_BLOCKS, start=1):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", name=f"b{i}_dw")(x)
        x = layers.ReLU(name=f"b{i}_dw_relu")(layers.BatchNormalization(name=f"b{i}_dw_bn")(x))
        x = layers.Conv2D(int(filters * alpha), 1, name=f"b{i}_pw", **common)(x)
        x = layers.ReLU(name=f"b{i}_pw_relu")(layers.BatchNormalization(name=f"b{i}_pw_bn")(x))
    x = layers.Flatten(name="flatten")(_mlperf_pool(x, "pool"))
    outputs = layers.Dense(num_classes, activation="softmax", name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def mlperf_tiny_resnet8(num_classes=10, input_shape=(32, 32, 3), weight_decay=2e-4, name="mlperf_tiny_resnet8"):
    """MLPerf Tiny image classification: ResNet-8 of `image_classification/keras_model.py`.

    conv 16-BN-ReLU, three stages of one basic block (16, 32, 64 filters):
    conv 3x3-BN-ReLU-conv 3x3-BN added to the identity (stage 1) or to a
    1x1 stride-2 projection without BN (stages 2, 3, which open with
    stride 2), then ReLU; average pooling over the whole 8x8 map, softmax.
    Convs keep their biases, start He normal and carry coupled L2
    `weight_decay` (the reference's l2(1e-4) is 2e-4 here); the classifier is
    He normal without L2.

    >>> m = tfs.zoo.mlperf_tiny_resnet8()
    >>> m.count_params(), m.output_shape
    (78666, (None, 10))
    """
    layers = keras.layers
    reg = _l2(weight_decay)

    def conv(x, filters, size, stride, label):
        return layers.Conv2D(filters, size, strides=stride, padding="same", kernel_initializer="he_normal",
                             kernel_regularizer=reg, name=label)(x)

    inputs = keras.Input(input_shape, name="image")
    x = conv(inputs, 16, 3, 1, "stem_conv")
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    for s, filters in enumerate((16, 32, 64), start=1):
        stride = 1 if s == 1 else 2
        h = layers.BatchNormalization(name=f"s{s}_bn1")(conv(x, filters, 3, stride, f"s{s}_conv1"))
        h = layers.ReLU(name=f"s{s}_relu1")(h)
        h = layers.BatchNormalization(name=f"s{s}_bn2")(conv(h, filters, 3, 1, f"s{s}_conv2"))
        shortcut = x if stride == 1 else conv(x, filters, 1, stride, f"s{s}_proj")
        x = layers.ReLU(name=f"s{s}_out")(layers.Add(name=f"s{s}_add")([shortcut, h]))
    x = layers.Flatten(name="flatten")(_mlperf_pool(x, "pool"))
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer="he_normal", name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def mlperf_tiny_autoencoder(input_dim=640, hidden=(128, 128, 128, 128, 8, 128, 128, 128, 128), weight_decay=0.0,
                            name="mlperf_tiny_autoencoder"):
    """MLPerf Tiny anomaly detection: the FC autoencoder of `anomaly_detection/keras_model.py`.

    Dense-BN-ReLU for each of `hidden` (128 x4, the 8-unit bottleneck,
    128 x4), then a linear Dense back to `input_dim` (5 frames x 128 log-mel
    bins). The reference has no weight decay; `weight_decay` puts coupled L2
    on the kernels.

    >>> m = tfs.zoo.mlperf_tiny_autoencoder()
    >>> m.count_params(), m.output_shape
    (269992, (None, 640))
    """
    layers = keras.layers
    reg = _l2(weight_decay)
    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for i, units in enumerate(hidden, start=1):
        x = layers.Dense(units, kernel_regularizer=reg, name=f"fc{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(layers.BatchNormalization(name=f"bn{i}")(x))
    outputs = layers.Dense(input_dim, kernel_regularizer=reg, name="reconstruction")(x)
    return keras.Model(inputs, outputs, name=name)


def mnist1d_vit(dim=32, heads=2, blocks=2, patch=4, mlp_ratio=2, num_classes=10, seq_len=40, ffn_activation="gelu",
                name="mnist1d_vit"):
    """A small ViT-style classifier for MNIST-1D, written as Keras 3 code is today.

    Patches by a strided Conv1D, a learned position embedding added with `+`,
    `blocks` pre-norm transformer blocks (`MultiHeadAttention`, LayerNorm,
    an FFN whose `ffn_activation` is applied as a function (GELU; "relu" for
    TFLite Micro, which has no GELU kernel), residual `+`), mean pooling and a
    Dense head (logits). Attention projections live inside the
    `MultiHeadAttention` layers; every method reaches them (`tfs.prunable`).

    >>> m = mnist1d_vit()
    >>> m.output_shape, m.count_params()
    ((None, 10), 17962)
    """
    inputs = keras.Input((seq_len, 1))
    x = keras.layers.Conv1D(dim, patch, strides=patch, name="patches")(inputs)
    # Position indices from the symbolic tensor itself (a constant would be
    # folded at construction and the embedding never trained).
    index = keras.ops.cast(keras.ops.cumsum(keras.ops.ones_like(x[..., 0]), axis=1) - 1, "int32")
    x = x + keras.layers.Embedding(seq_len // patch, dim, name="positions")(index)
    for b in range(blocks):
        h = keras.layers.LayerNormalization(name=f"block{b}_ln1")(x)
        x = x + keras.layers.MultiHeadAttention(heads, dim // heads, name=f"block{b}_attention")(h, h)
        h = keras.layers.LayerNormalization(name=f"block{b}_ln2")(x)
        h = keras.activations.get(ffn_activation)(keras.layers.Dense(dim * mlp_ratio, name=f"block{b}_ffn1")(h))
        x = x + keras.layers.Dense(dim, name=f"block{b}_ffn2")(h)
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization(name="final_ln")(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x), name=name)
