"""Data files shipped with jaxrlhf (the DPO demo preference set lives in ``dpo_demo/``)."""
