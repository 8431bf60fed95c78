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
