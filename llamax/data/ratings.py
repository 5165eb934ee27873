"""Llama 2's preference ratings and the margins its reward models take from them (Touvron et
al. 2023, section 3.2.2 and Table 28): what a preference record's `rating` may say, and the
margin m(rating) the ranking loss subtracts from the score gap, by table ("small", "large",
or "none"). A pair without a rating takes margin 0.

Data knows the ratings (`llamax.data.preference` reads them into indices); the loss
(`llamax.losses.ranking_loss`) and the evaluation by rating level (`llamax.reward`) read
them from here.
"""

# The ratings, clearest first: a record's rating is one of these (or its index).
RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")
MARGINS = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}
