"""Clinical text for training: the narratives written for synthetic records (`narratives`) and the facts a
narrative states, to check it against its record (`narrative_facts`)."""
