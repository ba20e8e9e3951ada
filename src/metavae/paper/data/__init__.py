"""The paper's data sets: transformed MNIST, smallNORB and its synthetic stand-in, the mixtures of
Gaussians, the physics simulations and the exponential families."""
