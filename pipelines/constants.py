"""The shape of the problem, in one place: MNIST's images and classes."""

IMAGE_SIDE = 28  # MNIST images are square, 28 x 28 pixels
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)  # one image as stored: rows, cols (uint8 0-255)
INPUT_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 1)  # one image as the model takes it: rows, cols, channel
NUM_CLASSES = 10  # the digits 0-9
