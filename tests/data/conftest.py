from datahelp import shared_data  # noqa: F401  (fixture)
