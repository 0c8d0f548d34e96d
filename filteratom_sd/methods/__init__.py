"""The baselines behind the `AdapterMethod` interface (LieRA, peft's LoRA/LoHa/LoKr/OFT, BitFit, DiffFit, full),
their settings, and the registry that maps method names to classes (filter atoms included)."""
