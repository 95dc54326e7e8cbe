"""The node's application gateway: inbound messages to subscribers, delivery handles resolved."""
