"""The data plane: what every transport asks of the server, in one place.

Model resolution, admission, deadlines, request validation, the hand-off to a
version's batcher, classification, metrics and statistics; and the request types the
transports decode into and encode from.
"""
