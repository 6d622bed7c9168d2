"""``python -m mock_provider --port N`` (from tests/): serve the mock provider from its own process."""

from mock_provider.server import main

main()
