"""Generated gRPC and protobuf code for package whimbrel.v1 (do not edit; run `make proto`)."""
