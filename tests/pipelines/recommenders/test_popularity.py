from pipelines.recommenders.popularity import Popularity
from tests.recommender_mixin import RecommenderContract, planted_data


class TestPopularityContract(RecommenderContract):
    planted = False  # not personalised

    def make_model(self):
        return Popularity()


def test_same_ranking_for_every_user():
    data = planted_data()
    recs = Popularity().fit(data).recommend(list(data.user_ids), k=5, exclude_seen=False)
    assert (recs == recs[0]).all()
    counts = data.df["item_id"].value_counts()
    assert counts.reindex(recs[0]).is_monotonic_decreasing
