"""Pruning core: unit groups, surgery, criteria, rules, schedules and the Pruner."""
from secateur.pruning.criteria import CRITERIA, Criterion, make_criterion
from secateur.pruning.groups import Slot, UnitGroup, build_groups
from secateur.pruning.pruner import Pruner
from secateur.pruning.repair import reset_batchnorm_stats
from secateur.pruning.rules import Rule, ratio_for_param_fraction
from secateur.pruning.schedules import Schedule
from secateur.pruning.surgery import keep_units, merge_units, rescale_units

__all__ = ["CRITERIA", "Criterion", "Pruner", "Rule", "Schedule", "Slot", "UnitGroup", "build_groups",
           "keep_units", "make_criterion", "merge_units", "ratio_for_param_fraction", "rescale_units",
           "reset_batchnorm_stats"]
