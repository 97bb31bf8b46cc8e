"""Test support shipped with agentcp: a real local ACP server (FakeACPServer) and a pytest plugin."""
