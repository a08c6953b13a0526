"""The names of a data folder's question sets, shared by the builder and the evaluation."""

#: Every question set of a data folder (one ``<name>.jsonl`` each), in the order they are built.
QA_SETS = ("forget", "retain", "general", "heldout_forget", "heldout_retain", "heldout_general")
#: The sets whose questions are about the target (answered with obliterated responses).
FORGET_SETS = ("forget", "heldout_forget")
