"""The demo's two offline data sources: a pretraining corpus (`corpus`) and a generated security-domain instruction set (`domain`)."""  # noqa: E501
