"""The course's three latency prompts: a simple question, multi-step reasoning, a real-time exchange."""

COURSE_PROMPTS = {
    "simple_qa": "What do you know about the sun?",
    "multi_step_reasoning": (
        "I want to bake a cake for a party of eight. My budget is 20 dollars, I prefer chocolate, and one guest "
        "cannot eat nuts. Plan it step by step: list the ingredients, estimate the cost of each, check the "
        "budget and the nut allergy, then write the recipe."),
    "real_time_interaction": (
        "You are a senior developer. A junior developer says: 'The checkout page of our web app shows a blank "
        "screen after I click pay.' Guide them, one question at a time, through finding and fixing the bug."),
}
