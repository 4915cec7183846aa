"""What the tests share about running Train_cifar.py: the tiny, fast arguments and the run prefix they give."""

PREFIX = "cifar10_0.5_sym"
# Tests that are not about the network train a PreAct ResNet-18 of width 8 (the paper's is 64) through the same code
# path: about 50x less arithmetic per image and 3 MB checkpoints instead of 179 MB.
CIFAR_FAST = ["--batch_size", "8", "--warm_up", "1", "--eval_batch_size", "64", "--save_loss_every", "1",
              "--net_width", "8"]
