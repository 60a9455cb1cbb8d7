"""Leaf building blocks shared by several model parts (losses and matchers): point sampling and
pairwise mask costs. They import nothing from qsegformers."""
