"""Recipes: each wires library pieces (models, pruning surgery, data) into one job, configured by a
validated YAML file. `secateur.recipes.equivariant`: equivariance-aware FC pruning of a C4 CNN
(train -> distill -> prune -> adaptive fine-tune -> INT8)."""
