"""More base requests for the phrasing corpus, in domains and styles the original set does not cover.

``probes.templates.BASE_REQUESTS`` are uniform imperatives ("Describe how...", "Explain why..."), so a probe
trained on them can key on that one style. These are written fresh for the corpus: questions, first-person
situations, imperatives of other shapes, short and long, in ten new domains. None asks for a length, a
format, a case, a tone, a register or a subject change, so the only such demand in a prompt is the task's
instruction. IFEval's prompts are evaluation data and none is copied or paraphrased here.
"""

from __future__ import annotations

from probes.templates import BASE_REQUESTS, BaseRequest, base_requests, split_base_requests, split_requests

_NEW_DOMAINS: dict[str, tuple[str, ...]] = {
    "pets": (
        "My cat keeps scratching the sofa. What can I do about it?",
        "How often should a dog go to the vet?",
        "What does a goldfish need to stay healthy in a bowl or tank?",
        "We are thinking about adopting a rabbit. What should we know before we bring one home?",
        "Why do dogs wag their tails?",
        "Tell me how to introduce a new kitten to an older cat.",
        "Is it a good idea to feed a parrot seeds only?",
        "How do I teach a puppy to walk on a leash without pulling?",
        "What are the signs that a hamster is unwell?",
        "Walk me through trimming a dog's nails at home.",
        "Why do cats purr?",
        "My neighbour's dog barks all day while they are at work. How could I bring this up with them?",
        "What should go into a first-aid kit for pets?",
    ),
    "games": (
        "How do you play checkers?",
        "What makes a board game fun for a whole family?",
        "I always lose at Monopoly. Any strategy advice?",
        "Tell me how a crossword puzzle is put together.",
        "Why are puzzle games so satisfying?",
        "How does a tabletop role-playing game session usually go?",
        "What is the difference between a card game of skill and one of luck?",
        "My friends want to start a weekly game night. How should we organise it?",
        "How do speedrunners finish video games so quickly?",
        "Teach me the rules of dominoes.",
        "What should I think about when designing my own simple card game?",
        "Why do people enjoy solving jigsaw puzzles?",
        "How is a sudoku solved without guessing?",
    ),
    "clothing": (
        "How do I get a red wine stain out of a cotton shirt?",
        "What should I wear to a summer wedding in the countryside?",
        "Why do wool sweaters shrink in the wash?",
        "Tell me how to sew a button back onto a coat.",
        "How can I tell whether a pair of shoes fits properly?",
        "I have a job interview at a bank next week and no idea what to wear. Help?",
        "What is the difference between linen and cotton?",
        "How should winter clothes be stored over the summer?",
        "Why do some jeans fade faster than others?",
        "Give me a way to pack clothes for a week so they do not wrinkle.",
        "What does a tailor do when altering a suit?",
        "How do waterproof jackets keep rain out but still let sweat escape?",
        "Is it worth repairing old clothes instead of buying new ones?",
    ),
    "civics": (
        "How does a bill become a law?",
        "What does a city council actually do?",
        "I just turned eighteen. How do I register to vote?",
        "Why do countries have constitutions?",
        "What is the job of a jury in a trial?",
        "How are local taxes used in a town?",
        "Tell me what happens at a public town hall meeting.",
        "What is the difference between a mayor and a city manager?",
        "How do petitions work?",
        "Why are elections held on a fixed schedule?",
        "My street has a broken streetlight. Who should I contact and how?",
        "What does it mean to be a citizen of a country?",
        "How does a census help a government plan?",
    ),
    "mind": (
        "Why do we forget people's names right after meeting them?",
        "How can I stop procrastinating on important tasks?",
        "What happens in the brain when we form a habit?",
        "I get nervous before speaking in front of people. What helps?",
        "Why do some people remember their dreams and others do not?",
        "How does mindfulness meditation work?",
        "What is the difference between being alone and being lonely?",
        "Tell me how to build a habit of reading every day.",
        "Why is it so hard to make decisions when there are too many options?",
        "How can I concentrate better while studying in a noisy place?",
        "What is a growth mindset?",
        "Why do we feel tired after a day of doing nothing?",
        "How do people learn to cope with change?",
    ),
    "weather": (
        "How do weather forecasters predict rain?",
        "Why does thunder come after lightning?",
        "What causes fog on cool mornings?",
        "We are planning a picnic on Saturday. How can I tell if it will stay dry?",
        "How does a hurricane form?",
        "Why is it colder on top of a mountain?",
        "What is the difference between weather and climate?",
        "How are snowflakes formed?",
        "Why do some places get so much more rain than others?",
        "Tell me how a barometer works.",
        "What should I do if I am caught outside in a thunderstorm?",
        "Why does the wind blow?",
        "How do people measure how much rain has fallen?",
    ),
    "language": (
        "Why does English spelling seem so inconsistent?",
        "How do children learn to talk?",
        "What is the difference between a dialect and a language?",
        "I want to learn Spanish before a trip in three months. Where do I start?",
        "How do new words get added to a dictionary?",
        "Why do some languages have gendered nouns?",
        "Tell me how sign languages work.",
        "What makes a good translation?",
        "How did writing systems first develop?",
        "Why do people from different regions have different accents?",
        "What is an idiom, and why are idioms hard to translate?",
        "How can I improve my vocabulary?",
        "Why do languages change over time?",
    ),
    "crafts": (
        "How do I start knitting a simple scarf?",
        "What tools do I need to make candles at home?",
        "Teach me how to fold a paper crane.",
        "How is soap made by hand?",
        "I found an old wooden chair at a flea market. How do I restore it?",
        "What is the easiest way to start making jewellery?",
        "How does screen printing on T-shirts work?",
        "What kind of glue should I use for a wooden model?",
        "How is a handmade book bound?",
        "Tell me how to make a simple bird feeder from scrap wood.",
        "What is embroidery, and how do beginners learn it?",
        "How do I choose yarn for a first crochet project?",
        "Why do potters fire clay in a kiln?",
    ),
    "cities": (
        "Why are some old cities laid out in a grid and others are not?",
        "How do skyscrapers stay up in strong wind?",
        "What makes a park pleasant to spend time in?",
        "How does a city get its drinking water?",
        "I am moving to a big city for the first time. How do I find my way around?",
        "Why do cities have so many traffic roundabouts in some countries?",
        "How is a bridge designed?",
        "What happens to the rubbish a city collects?",
        "Tell me how a city decides where to build new housing.",
        "Why are some buildings protected as historic monuments?",
        "How do architects make a building use less energy?",
        "What is it like to live in a very small apartment?",
        "How are tunnels dug under a river?",
    ),
    "media": (
        "How is a film's soundtrack made?",
        "What makes a mystery novel hard to put down?",
        "A friend and I are starting a podcast. What do we need?",
        "How does a newspaper decide what goes on the front page?",
        "Why do movie trailers show so much of the plot?",
        "How are animated films made today?",
        "What is the job of a film editor?",
        "How do book publishers choose which manuscripts to print?",
        "Why do some television shows get cancelled after one season?",
        "Tell me how a documentary is researched.",
        "What is the difference between a novel and a novella?",
        "How do radio stations pick the songs they play?",
        "My book club is choosing its next read. How should we pick one?",
    ),
}

NEW_REQUESTS: tuple[BaseRequest, ...] = base_requests(_NEW_DOMAINS)
# Every base request the corpus draws from: the original ones first, then the new ones.
ALL_REQUESTS: tuple[BaseRequest, ...] = (*BASE_REQUESTS, *NEW_REQUESTS)
SPLIT_SEED = 13


def base_splits(seed: int = SPLIT_SEED) -> dict[str, str]:
    """Request id -> "train" | "test". The original requests keep the split the probe dataset uses
    (``split_base_requests(13)``); the new ones are split the same way among themselves."""
    old_train, old_test = split_base_requests(seed)
    new_train, new_test = split_requests(NEW_REQUESTS, seed)
    return {**dict.fromkeys(old_train + new_train, "train"), **dict.fromkeys(old_test + new_test, "test")}
