"""The interest model in pure PyTorch (no Ray, no boto3): the networks (`interest_model`,
`features`, `tracking`, `enhancement`, `relevance`), the losses and their policy, and the artifact."""
